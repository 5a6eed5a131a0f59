"""Small many-in-one checkpoints written directly (no training run): a tiny random parent and
budgets whose architectures trim every axis, heads inside their groups and Mamba head channels
included, so that view children have blocks on every axis; and the same for the tiny MoE parent
(routed experts kept inside their routing groups, expert and shared-expert widths trimmed)."""

import torch
from reference import randomize_

from megatron_elastic.config.schema import ElasticConfig
from megatron_elastic.elastic import ElasticSpace, Router, full_architecture, homogeneous, manyinone
from megatron_elastic.elastic.space import child_config
from megatron_elastic.model import HybridLM, num_parameters, preset

BUDGETS = [1.0, 0.75, 0.5]
MOE_BUDGETS = [1.0, 0.5]


def architectures(cfg):
    return [
        full_architecture(cfg),
        homogeneous(cfg, hidden=112, ffn=288, mamba_heads=6),
        homogeneous(cfg, hidden=96, ffn=192, attn_heads=2, mamba_heads=4, mamba_head_dim=24, drop_layers=(6,)),
    ]


def save_many_in_one(dst, parent, space, archs, budgets):
    """``parent`` with one resolved architecture per budget (``archs[i]`` for ``budgets[i]``) at ``dst``."""
    cfg = parent.config
    full = sum(num_parameters(cfg).values())
    meta = manyinone.metadata(
        space, budgets, lambda i: archs[i],
        cost_fraction=lambda i: sum(num_parameters(child_config(cfg, archs[i])).values()) / full,
        cfg=ElasticConfig(router_hidden=16),
    )  # fmt: skip
    manyinone.save(dst, model=parent, router=Router(space, budgets, hidden_size=16), metadata=meta)
    return dst, parent, archs


def write_many_in_one(dst, seed: int = 0):
    cfg = preset("tiny")  # M-M*-M-, hidden 128, 2 KV groups x 2 query heads, 2 Mamba groups x 4 heads
    torch.manual_seed(seed)
    parent = randomize_(HybridLM(cfg), seed=seed).eval()
    space = ElasticSpace.from_sizes(cfg, {"hidden": [128, 112, 96], "ffn": [384, 288, 192], "attn_heads": [4, 2],
                                          "mamba_heads": [8, 6, 4], "mamba_head_dim": [32, 24], "depth": [7, 6]},
                                    depth_order=[6, 5, 4, 3, 2, 1, 0])  # fmt: skip
    return save_many_in_one(dst, parent, space, architectures(cfg), BUDGETS)


def write_moe_many_in_one(dst, seed: int = 0):
    cfg = preset("tiny-moe")  # M-ME*ME: the tiny parent with 2 MoE layers of 8 experts in 2 routing groups
    torch.manual_seed(seed)
    parent = randomize_(HybridLM(cfg), seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # correction biases large enough to change some choices
        for block in parent.layers:
            if block.layer_type == "E":
                block.mixer.gate.e_score_correction_bias.copy_(0.3 * torch.randn(cfg.num_moe_experts, generator=gen))
    space = ElasticSpace.from_sizes(cfg, {"hidden": [128, 96], "ffn": [384, 192], "mamba_heads": [8, 4],
                                          "moe_experts": [8, 4], "moe_ffn": [128, 64], "moe_shared_ffn": [192, 96]})  # fmt: skip
    archs = [full_architecture(cfg),
             homogeneous(cfg, hidden=96, ffn=192, mamba_heads=4, moe_experts=4, moe_ffn=64, moe_shared_ffn=96)]  # fmt: skip
    return save_many_in_one(dst, parent, space, archs, MOE_BUDGETS)
