"""The one parameter layout: the slice plan names every parameter, the packed Mamba offsets match a
hand computation, and the tensor-parallel partition functions tile every component exactly once."""

import pytest
import torch

from megatron_elastic.elastic import extract, homogeneous
from megatron_elastic.elastic.space import slice_plan
from megatron_elastic.model import HybridConfig, HybridLM
from megatron_elastic.model.config import ATTENTION, MAMBA, MLP
from megatron_elastic.model.layout import (
    ALL, LayerKeep, MambaLayout, as_index, attention_shard, compact, component_layout, layer_plan, mamba_shard,
    model_plan, shard_index,
)  # fmt: skip

# 4 B/C groups of 2 heads (P=6, N=4), 4 KV groups of 2 query heads
CFG = dict(
    pattern="M*-M-*M", vocab_size=96, hidden_size=48, ffn_hidden_size=64, num_attention_heads=8,
    num_query_groups=4, head_dim=10, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=4,
    mamba_state_dim=4, mamba_chunk_size=8,
)  # fmt: skip


def _config(**kw) -> HybridConfig:
    return HybridConfig(**(CFG | kw))


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(mlp_bias=True, mamba_proj_bias=True), dict(mamba_conv_bias=False), dict(tie_embeddings=True)],
)  # fmt: skip
def test_plan_names_every_parameter(kw):
    config = _config(**kw)
    model = HybridLM(config)
    kinds = set()
    for i, block in enumerate(model.layers):
        kinds.add(block.layer_type)
        assert set(layer_plan(config, i)) == {n for n, _ in block.named_parameters()}, (i, block.layer_type)
    assert kinds == {MAMBA, ATTENTION, MLP}
    planned = set(model_plan(config))
    for i in range(config.num_layers):
        planned |= {f"layers.{i}.{k}" for k in layer_plan(config, i)}
    assert planned == {n for n, _ in model.named_parameters()}


def test_full_plan_is_the_identity_and_a_cut_plan_gives_the_childs_shapes():
    config = _config(mlp_bias=True, mamba_proj_bias=True)
    model = HybridLM(config)
    params = dict(model.named_parameters())
    for i in range(config.num_layers):
        for k, cut in layer_plan(config, i, torch.arange(config.hidden_size)).items():
            assert torch.equal(cut.apply(params[f"layers.{i}.{k}"]), params[f"layers.{i}.{k}"]), (i, k)
    arch = homogeneous(config, hidden=32, ffn=40, attn_heads=4, mamba_heads=4, mamba_head_dim=4, drop_layers=(2,))
    child = dict(extract(model, arch).named_parameters())
    renumber = {old: new for new, old in enumerate(arch.kept_layers())}
    plan = slice_plan(config, arch)
    assert len(plan) == len(child)
    for name, cut in plan.items():
        if name.startswith("layers."):
            _, old, rest = name.split(".", 2)
            name_in_child = f"layers.{renumber[int(old)]}.{rest}"
        else:
            name_in_child = name
        assert cut.apply(params[name]).shape == child[name_in_child].shape, name


def test_packed_mamba_offsets_by_hand():
    lay = MambaLayout.of(_config(), 0)
    # H*P = 8*6 = 48, G*N = 4*4 = 16, H = 8
    assert [(c.name, c.offset, c.size) for c in lay.in_proj] == [
        ("z", 0, 48), ("x", 48, 48), ("B", 96, 16), ("C", 112, 16), ("dt", 128, 8)
    ]  # fmt: skip
    assert [(c.name, c.offset, c.size) for c in lay.conv] == [("x", 0, 48), ("B", 48, 16), ("C", 64, 16)]
    assert lay.component("dt").slice == slice(128, 136)
    assert lay.component("B", "conv").slice == slice(48, 64)
    # group 2 reads heads 4, 5, whose channels are rows 24..35 of z / x
    assert lay.group_heads(2).tolist() == [4, 5]
    assert lay.group_rows(2).tolist() == list(range(24, 36))
    # keep head 5, channels 1 and 4 of it: d_inner rows 31, 34
    chans = torch.tensor([31, 34])
    assert lay.in_proj_rows(chans, torch.tensor([5])).tolist() == [31, 34, 79, 82, *range(96, 128), 133]
    assert lay.conv_rows(chans).tolist() == [31, 34, *range(48, 80)]
    # the plan of a Mamba layer keeping heads {0, 1, 4, 5} (groups 0 and 2) and channels {0, 1} of each head
    plan = layer_plan(_config(), 0, keep=LayerKeep(mamba_heads=torch.tensor([0, 1, 4, 5]), mamba_head_dim=slice(0, 2)))
    rows = [0, 1, 6, 7, 24, 25, 30, 31]
    assert as_index(plan["mixer.norm.weight"].rows, 48).tolist() == rows
    assert as_index(plan["mixer.in_proj.weight"].rows, 136).tolist() == [
        *rows, *(48 + r for r in rows), *range(96, 128), 128, 129, 132, 133
    ]  # fmt: skip
    assert as_index(plan["mixer.A_log"].rows, 8).tolist() == [0, 1, 4, 5]


def test_prefixes_become_slices():
    assert compact(torch.arange(3, 7)) == slice(3, 7)
    assert torch.equal(compact(torch.tensor([0, 2])), torch.tensor([0, 2]))
    plan = layer_plan(_config(), 2, hidden=torch.arange(32), keep=LayerKeep(ffn=torch.arange(16)))
    assert plan["mixer.up_proj.weight"].rows == slice(0, 16) and plan["mixer.up_proj.weight"].cols == slice(0, 32)
    assert layer_plan(_config(), 0)["mixer.in_proj.weight"].rows == ALL


def _tiles(pieces: list[torch.Tensor], n: int) -> bool:
    """Each of 0..n-1 exactly once over the pieces."""
    allrows = torch.cat(pieces)
    return allrows.numel() == n and torch.equal(allrows.sort().values, torch.arange(n))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_partition_functions_tile_every_component_once(tp):
    config = _config()
    lay = MambaLayout.of(config, 0)
    shards = [mamba_shard(lay, tp, r) for r in range(tp)]
    for c in lay.in_proj:  # each component of in_proj: rank r holds its r-th chunk
        inside = [(s.in_proj_rows >= c.offset) & (s.in_proj_rows < c.offset + c.size) for s in shards]
        mine = [s.in_proj_rows[m] - c.offset for s, m in zip(shards, inside)]
        assert _tiles(mine, c.size), c.name
        for r, rows in enumerate(mine):
            assert rows.tolist() == list(range(r * c.size // tp, (r + 1) * c.size // tp)), (c.name, r)
    assert _tiles([s.in_proj_rows for s in shards], 136)
    assert _tiles([s.conv_rows for s in shards], 80)
    assert _tiles([s.heads for s in shards], 8) and _tiles([s.channels for s in shards], 48)
    for r, s in enumerate(shards):  # a rank holds whole B/C groups: its heads and their channels
        groups = range(r * 4 // tp, (r + 1) * 4 // tp)
        assert s.heads.tolist() == [h for g in groups for h in lay.group_heads(g).tolist()]
        assert s.channels.tolist() == [c for g in groups for c in lay.group_rows(g).tolist()]
    # attention: whole KV groups and the query heads that read them
    attn = [attention_shard(8, 4, 10, tp, r) for r in range(tp)]
    assert _tiles([q for q, _ in attn], 80) and _tiles([kv for _, kv in attn], 40)
    for q, kv in attn:
        q_heads, kv_heads = set((q // 10).tolist()), set((kv // 10).tolist())
        assert {h // 2 for h in q_heads} == kv_heads  # query head j reads KV head j // (8 / 4)
    assert _tiles([shard_index(64, tp, r) for r in range(tp)], 64)  # FFN neurons
    assert _tiles([shard_index(96, tp, r) for r in range(tp)], 96)  # vocabulary
    # the checkpoint components of every parameter cover its local tensor once, in packed order
    for name, p in HybridLM(config, init=False).named_parameters():
        comps = component_layout(config, name, p.dim(), tp)
        if len(comps) > 1:
            stops = [c.local_slice[0] for c in comps]
            assert stops[0].start == 0 and all(a.stop == b.start for a, b in zip(stops, stops[1:]))
            assert stops[-1].stop * tp == p.shape[0], name
