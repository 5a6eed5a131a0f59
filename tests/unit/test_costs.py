"""Costs of the expected architecture: exact at one-hot probabilities (parameter count of the
extracted child, memory by hand, latency at the table's points), smooth in between; the router
loss band."""

import json
import random
import warnings

import pytest
import torch
from reference import randomize_

from megatron_elastic.elastic import child_config, extract
from megatron_elastic.elastic.costs import (
    Cost,
    expected_architecture,
    latency,
    memory,
    one_hot,
    params,
    profile_latency,
    router_loss,
)
from megatron_elastic.elastic.search_space import ElasticSpace
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, num_parameters, preset

# Every axis non-trivial, biases everywhere (they enter the parameter count).
PARENT = dict(
    pattern="M*-M-*M", vocab_size=101, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6,
    num_query_groups=2, head_dim=10, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=2,
    mamba_state_dim=4, mamba_chunk_size=8, mlp_bias=True, mamba_proj_bias=True,
)  # fmt: skip
FRACTIONS = dict(hidden=[1.0, 0.75, 0.5], ffn=[1.0, 0.75, 0.5, 0.25], attn_heads=[1.0, 2 / 3, 1 / 3],
                 mamba_heads=[1.0, 0.75, 0.5, 0.25], mamba_head_dim=[1.0, 0.5], depth=[1.0, 0.75, 0.5])  # fmt: skip


def space(config, heterogeneous=False, **kw):
    return ElasticSpace(config, **(FRACTIONS | kw), heterogeneous=heterogeneous, depth_order=[2, 6, 0, 4, 1, 5, 3])


def random_indices(sp: ElasticSpace, rng: random.Random) -> dict:
    out = {}
    for axis in sp.axes:
        n = len(sp.choices(axis))
        out[axis] = [rng.randrange(n) for _ in sp.layer_indices(axis)] if sp.is_per_layer(axis) else rng.randrange(n)
    return out


@pytest.mark.parametrize("heterogeneous", [False, True])
@pytest.mark.parametrize("tied,protect", [(False, False), (True, True)])
def test_params_cost_is_num_parameters_at_one_hot(heterogeneous, tied, protect):
    cfg = HybridConfig(**(PARENT | dict(tie_embeddings=tied)))
    sp = space(cfg, heterogeneous, protect_attention=protect, attn_heads=[1.0] if protect else FRACTIONS["attn_heads"])
    rng = random.Random(int(heterogeneous) + 2 * int(tied))
    dropped_some = het_sizes = 0
    for _ in range(60):
        idx = random_indices(sp, rng)
        arch = sp.architecture(idx)
        expected = sum(num_parameters(child_config(cfg, arch)).values())
        got = params(sp, one_hot(sp, idx))
        assert got.dtype == torch.float64 and got.item() == expected  # exact, not close
        dropped_some += len(arch.kept_layers()) < cfg.num_layers
        het_sizes += len({layer.ffn_hidden_size for layer in arch.layers if layer.kind == "-"}) > 1
    assert dropped_some > 10 and (het_sizes > 10) == heterogeneous


def test_params_cost_is_numel_of_the_extracted_child():
    cfg = HybridConfig(**PARENT)
    parent = randomize_(HybridLM(cfg), seed=0)
    for heterogeneous in (False, True):
        sp = space(cfg, heterogeneous)
        rng = random.Random(7)
        for _ in range(6):
            idx = random_indices(sp, rng)
            child = extract(parent, sp.architecture(idx))
            assert params(sp, one_hot(sp, idx)).item() == sum(p.numel() for p in child.parameters())
    full = Cost(space(cfg), "params").full
    assert full == parent.num_parameters()


def test_params_cost_on_a_large_parent_stays_exact():
    cfg = preset("nemotron-nano-12b-v2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some fractions collapse after rounding to groups
        sp = ElasticSpace(cfg, **FRACTIONS, heterogeneous=True, multiple_of=16)
    rng = random.Random(0)
    for _ in range(5):
        idx = random_indices(sp, rng)
        child = child_config(cfg, sp.architecture(idx))
        assert params(sp, one_hot(sp, idx)).item() == sum(num_parameters(child).values())
    assert Cost(sp).full == sum(num_parameters(cfg).values()) > 1.2e10


def test_expected_cost_interpolates_and_has_gradients():
    cfg = HybridConfig(**PARENT)
    sp = space(cfg)
    probs = one_hot(sp, {"ffn": 1, "hidden": 1})
    lo, hi = params(sp, one_hot(sp, {"ffn": 3, "hidden": 1})), params(sp, probs)
    # The count is linear in the FFN size at a fixed hidden size: a 50/50 mixture costs the mean.
    probs["ffn"] = torch.tensor([0.0, 0.5, 0.0, 0.5], requires_grad=True)
    mixed = params(sp, probs)
    torch.testing.assert_close(mixed, (lo + hi) / 2, rtol=0, atol=1e-6)
    mixed.backward()
    g = probs["ffn"].grad  # d cost / d p_k = the cost of each choice's FFN layers, larger first
    assert (g[:-1] > g[1:]).all() and g[-1] > 0
    e = expected_architecture(sp, probs)
    assert e.ffn.tolist() == [(48 + 16) / 2] * 2 and e.keep.tolist() == [1.0] * 7


def test_memory_cost_by_hand():
    cfg = preset("tiny")  # M - M * - M -
    sp = ElasticSpace(cfg, hidden=[1.0, 0.75], ffn=[1.0, 0.5], attn_heads=[1.0, 0.5], mamba_heads=[1.0, 0.5],
                      mamba_head_dim=[1.0, 0.75], depth=[1.0, 6 / 7])  # fmt: skip
    idx = dict(hidden=1, ffn=1, attn_heads=1, mamba_heads=1, mamba_head_dim=1, depth=1)
    arch = sp.architecture(idx)
    assert arch.kept_layers() == [0, 1, 2, 3, 4, 5] and arch.hidden_size == 96  # drops the last layer
    weights = sum(num_parameters(child_config(cfg, arch)).values())
    batch, context = 3, 100
    kv = 2 * 2 * 48 * context * batch  # one attention layer: 2 x kv_heads x head_dim x context x batch
    H, P, G, N, K = 4, 24, 2, 32, 4
    mamba = 3 * batch * ((H * P + 2 * G * N) * (K - 1) + H * P * N)  # three Mamba layers: conv + SSM state
    got = memory(sp, one_hot(sp, idx), bytes_per_param=2, batch=batch, context=context)
    assert got.item() == 2 * (weights + kv + mamba)
    got = memory(sp, one_hot(sp, idx), bytes_per_param=2, batch=batch, context=context, state_bytes=4)
    assert got.item() == 2 * weights + 4 * (kv + mamba)
    full = Cost(sp, "memory", batch=batch, context=context)
    assert full.full == 2 * (sum(num_parameters(cfg).values()) + kv + 3 * batch * ((256 + 128) * 3 + 256 * 32))


TABLE = {"hidden_size": 128, "M": {"256": 4.0, "128": 2.0}, "*": {"4": 3.0, "2": 1.0},
         "-": {"384": 6.0, "192": 4.0, "96": 1.0}, "output": {"128": 2.0, "64": 1.0}}  # fmt: skip


def test_latency_from_a_table():
    cfg = preset("tiny")  # M - M * - M -
    sp = ElasticSpace(cfg, hidden=[1.0, 0.5], ffn=[1.0, 0.5, 0.25], attn_heads=[1.0, 0.5], mamba_heads=[1.0, 0.5],
                      depth=[1.0, 6 / 7])  # fmt: skip
    table = json.loads(json.dumps(TABLE))  # as read back from a JSON file: string keys
    full = latency(sp, one_hot(sp, {}), table)
    assert full.item() == 3 * 4.0 + 3.0 + 3 * 6.0 + 2.0
    small = latency(sp, one_hot(sp, dict(hidden=1, ffn=2, attn_heads=1, mamba_heads=1, depth=1)), table)
    assert small.item() == pytest.approx(0.5 * (3 * 2.0 + 1.0 + 2 * 1.0) + 1.0)  # layers scale with hidden / 128
    probs = one_hot(sp, {})
    probs["ffn"] = torch.tensor([0.0, 0.5, 0.5])  # expected 144: halfway between the 96 and 192 points
    assert latency(sp, probs, table).item() == pytest.approx(full.item() - 3 * 6.0 + 3 * 2.5)
    sp_out = ElasticSpace.from_sizes(cfg, {"ffn": [384, 48]})  # below the table: proportional, 48 / 96 of 1.0
    assert latency(sp_out, one_hot(sp_out, {"ffn": 1}), table).item() == pytest.approx(full.item() - 3 * 6.0 + 3 * 0.5)
    table["-"] = {"192": 4.0, "96": 1.0}  # above the table: the 96-192 line continues
    assert latency(sp, one_hot(sp, {}), table).item() == pytest.approx(full.item() - 3 * 6.0 + 3 * 10.0)
    with pytest.raises(ConfigError, match="no timings for layer type '\\*'"):
        latency(sp, one_hot(sp, {}), {k: v for k, v in TABLE.items() if k != "*"})


def test_profile_latency_measures_every_choice():
    cfg = preset("tiny")
    sp = ElasticSpace(cfg, hidden=[1.0, 0.5], ffn=[1.0, 0.5], attn_heads=[1.0, 0.5], mamba_heads=[1.0, 0.5],
                      mamba_head_dim=[1.0, 0.5])  # fmt: skip
    table = profile_latency(cfg, "cpu", seq_len=16, batch=1, space=sp, repeats=2)
    assert set(table["-"]) == {384, 192} and set(table["*"]) == {4, 2} and set(table["M"]) == {256, 128}
    assert set(table["output"]) == {128, 64} and table["hidden_size"] == 128
    assert all(t > 0 for kind in ("M", "*", "-", "output") for t in table[kind].values())
    # Structure, not timings: the cost of an architecture is the table's entries at its sizes, summed
    # over its layers and scaled by its hidden size (a measured time may be anything positive).
    cost = Cost(sp, "latency", table=json.loads(json.dumps(table)))
    n = {kind: cfg.layer_types.count(kind) for kind in ("M", "*", "-")}

    def by_hand(hidden, mamba_width, heads, ffn):
        scale = hidden / table["hidden_size"]
        return table["output"][hidden] + scale * (n["M"] * table["M"][mamba_width] + n["*"] * table["*"][heads]
                                                  + n["-"] * table["-"][ffn])  # fmt: skip

    assert float(cost.full) == pytest.approx(by_hand(128, 256, 4, 384), rel=1e-9)
    small = cost(one_hot(sp, dict(ffn=1, mamba_heads=1, hidden=1))).item()
    assert small == pytest.approx(by_hand(64, 128, 4, 192), rel=1e-9)


def test_router_loss_band():
    full = torch.tensor(200.0, dtype=torch.float64)
    for cost, expected in [(100.0, 0.0), (104.9, 0.0), (95.5, 0.0), (110.0, 0.05), (80.0, 0.15), (200.0, 0.95)]:
        loss = router_loss(torch.tensor(cost, dtype=torch.float64), 0.5, full)
        assert loss.item() == pytest.approx(expected, abs=1e-12)
    c = torch.tensor(120.0, requires_grad=True)
    router_loss(c, 0.5, 200.0, tolerance=0.0).backward()
    assert c.grad.item() == pytest.approx(1 / 100)
    c = torch.tensor(102.0, requires_grad=True)
    router_loss(c, 0.5, 200.0).backward()
    assert c.grad.item() == 0.0  # inside the band: no push at all


def test_cost_kind_errors():
    sp = ElasticSpace(preset("tiny"))
    with pytest.raises(ConfigError, match="cost 'flops' is unknown; use one of params, active_params, memory, latency"):
        Cost(sp, "flops")
    with pytest.raises(ConfigError, match="needs a latency table"):
        Cost(sp, "latency")
    with pytest.raises(ValueError, match="probabilities of ffn have shape \\(2,\\); the space expects \\(1,\\)"):
        params(sp, {"ffn": torch.tensor([0.5, 0.5])})
