"""The central invariant: a masked parent computes what the sliced child computes, on every axis
alone and all together, homogeneous and heterogeneous; masked-out parameters get exactly zero
gradient."""

import random

import pytest
import torch
from helpers import check_masked_equals_sliced, random_arch
from reference import randomize_

from megatron_elastic.elastic import (
    Architecture, LayerArch, extract, full_architecture, hard_state, homogeneous, validate_architecture,
)  # fmt: skip
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, num_parameters

# Parent with every axis non-trivial: 2 Mamba groups x 4 heads, 2 KV groups x 3 query heads,
# biases everywhere, head_dim != hidden / heads.
PARENT = dict(
    pattern="M*-M-*M", vocab_size=101, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6,
    num_query_groups=2, head_dim=10, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=2,
    mamba_state_dim=4, mamba_chunk_size=8, mlp_bias=True, mamba_proj_bias=True,
)  # fmt: skip
# Logits are O(5); masked and sliced runs reduce over different shapes, so fp32 rounding differs.
TOL = 2e-4


@pytest.fixture(scope="module")
def parent():
    torch.manual_seed(0)
    return randomize_(HybridLM(HybridConfig(**PARENT)), seed=3).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (2, 29), generator=torch.Generator().manual_seed(0))


def check(parent, arch, tokens):
    return check_masked_equals_sliced(parent, arch, tokens, TOL)[0]


@pytest.mark.parametrize(
    "axis,kw",
    [
        ("hidden", dict(hidden=24)),
        ("ffn", dict(ffn=16)),
        ("attn_heads", dict(attn_heads=2)),
        ("mamba_heads", dict(mamba_heads=2)),
        ("mamba_head_dim", dict(mamba_head_dim=3)),
        ("depth", dict(drop_layers=(1, 2, 6))),
        ("all", dict(hidden=32, ffn=40, attn_heads=4, mamba_heads=6, mamba_head_dim=4, drop_layers=(4,))),
    ],
)
def test_homogeneous_masked_equals_sliced(parent, tokens, axis, kw):
    child = check(parent, homogeneous(parent.config, **kw), tokens)
    c = child.config
    assert not c.is_heterogeneous
    expected = {"hidden": ("hidden_size", 24), "ffn": ("ffn_hidden_size", 16), "attn_heads": ("num_attention_heads", 2),
                "mamba_heads": ("mamba_num_heads", 2), "mamba_head_dim": ("mamba_head_dim", 3)}  # fmt: skip
    if axis in expected:
        name, value = expected[axis]
        assert getattr(c, name) == value
    if axis == "depth":
        assert c.pattern == "MM-*"
    assert child.num_parameters() < parent.num_parameters()


@pytest.mark.parametrize("seed", range(6))
def test_heterogeneous_masked_equals_sliced(parent, tokens, seed):
    arch = random_arch(parent.config, random.Random(seed))
    child = check(parent, arch, tokens)
    kept = [arch.layers[i] for i in arch.kept_layers()]
    assert child.config.pattern == "".join(layer.kind for layer in kept)


def test_heterogeneous_parent(tokens):
    cfg = HybridConfig(**(PARENT | dict(ffn_hidden_size_per_layer=[64, 32], mamba_num_heads_per_layer=[8, 4, 6],
                                         mamba_head_dim_per_layer=[6, 6, 4], num_attention_heads_per_layer=[6, 4])))  # fmt: skip
    torch.manual_seed(1)
    parent = randomize_(HybridLM(cfg), seed=1).eval()
    assert parent.num_parameters() == sum(num_parameters(cfg).values())
    for seed in range(3):
        rng = random.Random(seed)
        full = full_architecture(cfg)
        layers = []
        for i, layer in enumerate(full.layers):
            d = cfg.layer_dims(i)
            layers.append(LayerArch(kind=layer.kind,
                                    ffn_hidden_size=rng.randint(1, d.ffn_hidden_size) if layer.kind == "-" else None,
                                    num_attention_heads=2 * rng.randint(1, d.num_attention_heads // 2) if layer.kind == "*" else None,
                                    mamba_num_heads=2 * rng.randint(1, d.mamba_num_heads // 2) if layer.kind == "M" else None,
                                    mamba_head_dim=rng.randint(1, d.mamba_head_dim) if layer.kind == "M" else None))  # fmt: skip
        check(parent, Architecture(hidden_size=rng.randint(8, 48), layers=tuple(layers)), tokens)


def test_full_architecture_is_the_parent(parent, tokens):
    arch = full_architecture(parent.config)
    state = hard_state(parent.config, arch)
    assert state.hidden is None and all(m.ffn is None and m.attn_heads is None for m in state.layers)
    child = extract(parent, arch)
    with torch.no_grad():
        torch.testing.assert_close(child(tokens), parent(tokens), rtol=0, atol=0)


def test_masked_out_parameters_get_exactly_zero_gradient(tokens):
    torch.manual_seed(2)
    parent = randomize_(HybridLM(HybridConfig(**PARENT)), seed=2).train()
    arch = homogeneous(parent.config, hidden=32, ffn=40, attn_heads=4, mamba_heads=6, mamba_head_dim=4)
    parent(tokens, elastic=hard_state(parent.config, arch)).logsumexp(-1).mean().backward()
    g = {n: p.grad for n, p in parent.named_parameters()}
    d = 32
    assert g["embedding.weight"][:, d:].abs().max() == 0 and g["embedding.weight"][:, :d].abs().max() > 0
    assert g["output_layer.weight"][:, d:].abs().max() == 0
    assert g["final_norm.weight"][d:].abs().max() == 0
    for i, kind in enumerate(parent.config.layer_types):
        pre = f"layers.{i}."
        assert g[pre + "norm.weight"][d:].abs().max() == 0
        if kind == "-":
            assert g[pre + "mixer.up_proj.weight"][40:].abs().max() == 0
            assert g[pre + "mixer.up_proj.weight"][:, d:].abs().max() == 0
            assert g[pre + "mixer.up_proj.bias"][40:].abs().max() == 0
            assert g[pre + "mixer.down_proj.weight"][:, 40:].abs().max() == 0
            assert g[pre + "mixer.down_proj.weight"][d:].abs().max() == 0
            assert g[pre + "mixer.down_proj.bias"][d:].abs().max() == 0
            assert g[pre + "mixer.up_proj.weight"][:40, :d].abs().max() > 0
        elif kind == "*":
            q = g[pre + "mixer.q_proj.weight"].view(2, 3, 10, 48)  # (kv group, head in group, head_dim, hidden)
            assert q[:, 2:].abs().max() == 0 and q[:, :2, :, :d].abs().max() > 0
            o = g[pre + "mixer.o_proj.weight"].view(48, 2, 3, 10)
            assert o[:, :, 2:].abs().max() == 0 and o[d:].abs().max() == 0
            assert g[pre + "mixer.k_proj.weight"][:, d:].abs().max() == 0
        else:
            H, P, G, N = 8, 6, 2, 4
            w = g[pre + "mixer.in_proj.weight"]
            z, x = w[: H * P].view(G, H // G, P, 48), w[H * P : 2 * H * P].view(G, H // G, P, 48)
            dt = w[2 * H * P + 2 * G * N :].view(G, H // G, 48)
            for t in (z, x):
                assert t[:, 3:].abs().max() == 0  # dropped heads (3 of 4 kept per group)
                assert t[:, :, 4:].abs().max() == 0  # dropped channels of every head
                assert t[:, :3, :4, :d].abs().max() > 0
            assert dt[:, 3:].abs().max() == 0 and dt[:, :3, :d].abs().max() > 0
            assert w[:, d:].abs().max() == 0
            conv = g[pre + "mixer.conv1d.weight"][: H * P].view(G, H // G, P, -1)
            assert conv[:, 3:].abs().max() == 0 and conv[:, :, 4:].abs().max() == 0
            for name in ("A_log", "D", "dt_bias"):
                assert g[pre + f"mixer.{name}"].view(G, H // G)[:, 3:].abs().max() == 0
            assert g[pre + "mixer.norm.weight"].view(G, H // G, P)[:, 3:].abs().max() == 0
            out = g[pre + "mixer.out_proj.weight"].view(48, G, H // G, P)
            assert out[:, :, 3:].abs().max() == 0 and out[:, :, :, 4:].abs().max() == 0 and out[d:].abs().max() == 0
            assert g[pre + "mixer.out_proj.bias"][d:].abs().max() == 0


def test_soft_masks_interpolate():
    torch.manual_seed(4)
    parent = randomize_(HybridLM(HybridConfig(**PARENT)), seed=4).eval()
    from megatron_elastic.elastic import axes_of

    t = torch.randint(0, 101, (1, 17))
    ax = axes_of(parent.config)["ffn"]
    p = torch.tensor([1.0, 0.0])
    soft = ax.soft_mask(p, (64, 16))
    torch.testing.assert_close(soft, torch.ones(64))
    p = torch.tensor([0.25, 0.75])
    soft = ax.soft_mask(p, (64, 16))
    assert soft[:16].eq(1).all() and torch.allclose(soft[16:], torch.full((48,), 0.25))
    from megatron_elastic.model import ElasticState, LayerMask

    state = ElasticState(layers=[LayerMask(ffn=soft) if k == "-" else LayerMask() for k in parent.config.layer_types])
    with torch.no_grad():
        out = parent(t, elastic=state)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(hidden=64), "hidden size 64 exceeds the parent's 48"),
        (dict(mamba_heads=3), "mamba_heads size 3 is not divisible by the 2 groups"),
        (dict(attn_heads=3), "attn_heads size 3 is not divisible by the 2 groups"),
        (dict(ffn=0), "ffn size 0 is invalid"),
        (dict(drop_layers=tuple(range(7))), "drops every layer"),
        (dict(mamba_head_dim=7), "mamba_head_dim size 7 exceeds"),
    ],
)
def test_infeasible_architectures(parent, kw, needle):
    with pytest.raises(ConfigError) as err:
        homogeneous(parent.config, **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_choice_lists_must_be_nested_and_unique():
    from megatron_elastic.elastic import Axis

    with pytest.raises(ConfigError, match="unique and sorted largest first"):
        Axis("ffn", 64, choices=(32, 64))
    with pytest.raises(ConfigError, match="unique and sorted largest first"):
        Axis("ffn", 64, choices=(64, 32, 32))
    with pytest.raises(ConfigError, match="not divisible by the 2 groups"):
        Axis("mamba_heads", 8, groups=2, choices=(8, 5))
    assert Axis("mamba_heads", 8, groups=2, choices=(8, 6, 2)).indices(6).tolist() == [0, 1, 2, 4, 5, 6]


def test_architecture_round_trip(parent):
    arch = homogeneous(parent.config, hidden=32, drop_layers=(2,))
    assert Architecture.from_dict(arch.to_dict()) == arch
    validate_architecture(parent.config, Architecture.from_dict(arch.to_dict()))
