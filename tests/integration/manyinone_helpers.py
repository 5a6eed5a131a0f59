"""A small many-in-one checkpoint written directly (no training run): a tiny random parent and
three budgets whose architectures trim every axis, heads inside their groups and Mamba head
channels included, so that view children have blocks on every axis."""

import torch
from reference import randomize_

from megatron_elastic.config.schema import ElasticConfig
from megatron_elastic.elastic import ElasticSpace, Router, full_architecture, homogeneous, manyinone
from megatron_elastic.elastic.space import child_config
from megatron_elastic.model import HybridLM, num_parameters, preset

BUDGETS = [1.0, 0.75, 0.5]


def architectures(cfg):
    return [
        full_architecture(cfg),
        homogeneous(cfg, hidden=112, ffn=288, mamba_heads=6),
        homogeneous(cfg, hidden=96, ffn=192, attn_heads=2, mamba_heads=4, mamba_head_dim=24, drop_layers=(6,)),
    ]


def write_many_in_one(dst, seed: int = 0):
    cfg = preset("tiny")  # M-M*-M-, hidden 128, 2 KV groups x 2 query heads, 2 Mamba groups x 4 heads
    torch.manual_seed(seed)
    parent = randomize_(HybridLM(cfg), seed=seed).eval()
    archs = architectures(cfg)
    space = ElasticSpace.from_sizes(cfg, {"hidden": [128, 112, 96], "ffn": [384, 288, 192], "attn_heads": [4, 2],
                                          "mamba_heads": [8, 6, 4], "mamba_head_dim": [32, 24], "depth": [7, 6]},
                                    depth_order=[6, 5, 4, 3, 2, 1, 0])  # fmt: skip
    full = sum(num_parameters(cfg).values())
    meta = manyinone.metadata(
        space, BUDGETS, lambda i: archs[i],
        cost_fraction=lambda i: sum(num_parameters(child_config(cfg, archs[i])).values()) / full,
        cfg=ElasticConfig(router_hidden=16),
    )  # fmt: skip
    manyinone.save(dst, model=parent, router=Router(space, BUDGETS, hidden_size=16), metadata=meta)
    return dst, parent, archs
