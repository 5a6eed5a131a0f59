"""Activation importance: the scores follow their definitions, known structure is found, the
depth methods order layers as specified, and a permuted parent ranks as the identity."""

import json

import pytest
import torch
from reference import randomize_
from test_permute import make, tokens_for

from megatron_elastic import cli
from megatron_elastic.elastic import extract, homogeneous
from megatron_elastic.elastic.importance import (
    DEPTH_METHODS, Ranking, activation_scores, compute_ranking, depth_random, mamba_scores, ranked,
)  # fmt: skip
from megatron_elastic.elastic.permute import permute_
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM

# A small parent for the depth tests (iterative MSE costs ~n^2/2 forward passes).
SMALL = dict(
    pattern="M-*-M-", vocab_size=64, hidden_size=32, ffn_hidden_size=24, num_attention_heads=4,
    num_query_groups=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=4, mamba_num_groups=2,
    mamba_state_dim=4, mamba_chunk_size=8,
)  # fmt: skip


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def calib(config, n=2, length=16):
    return [tokens_for(config, length=length, seed=10 + s) for s in range(n)]


def small_model(seed=2):
    torch.manual_seed(seed)
    return randomize_(HybridLM(HybridConfig(**SMALL)), seed=seed).eval()


@torch.no_grad()
def reference_scores(model, batches):
    """The definitions, computed block by block without hooks."""
    cfg = model.config
    out = {"hidden": torch.zeros(cfg.hidden_size, dtype=torch.float64), "ffn": {}, "attn": {}, "mamba": {},
           "influence": torch.zeros(cfg.num_layers, dtype=torch.float64)}  # fmt: skip
    tokens_seen = 0

    def add(key, i, v):
        out[key][i] = out[key].get(i, 0) + v.double()

    for tokens in batches:
        x = model.embedding(tokens)
        for i, block in enumerate(model.layers):
            n = block.norm(x)
            out["hidden"] += n.abs().sum((0, 1)).double()
            m = block.mixer
            if block.layer_type == "-":
                add("ffn", i, m.up_proj(n).abs().sum((0, 1)))
            elif block.layer_type == "*":
                add("attn", i, m.q_proj(n).abs().sum((0, 1)))
            else:
                b, L, _ = n.shape
                xs = m.in_proj(n)[..., m.d_inner : 2 * m.d_inner].reshape(b, L, m.num_heads, m.head_dim)
                add("mamba", i, xs.abs().sum((0, 1)))
            y = block(x)
            out["influence"][i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum().double()
            x = y
        out["hidden"] += model.final_norm(x).abs().sum((0, 1)).double()
        tokens_seen += tokens.numel()
    out["influence"] /= tokens_seen
    return out


def test_scores_follow_their_definitions():
    model = make("grouped")
    batches = calib(model.config)
    ref = reference_scores(model, batches)
    act = activation_scores(model, batches)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(act["hidden"], ref["hidden"], **close)
    torch.testing.assert_close(act["block_influence"], ref["influence"], **close)
    for i in ref["ffn"]:
        torch.testing.assert_close(act["ffn"][i], ref["ffn"][i], **close)
    for i in ref["attn"]:
        torch.testing.assert_close(act["attn_channels"][i], ref["attn"][i], **close)
    for i in ref["mamba"]:
        torch.testing.assert_close(act["mamba_x"][i], ref["mamba"][i], **close)
    r = compute_ranking(model, batches, depth_method="random")
    hd = model.config.head_dim
    for i, a in ref["attn"].items():
        heads = a.view(-1, hd).norm(dim=1)
        torch.testing.assert_close(f64(r.scores["attn_heads"][i]), heads, **close)
        assert r.attn_heads[i] == ranked(heads, groups=model.config.num_query_groups)
    for i, S in ref["mamba"].items():
        torch.testing.assert_close(f64(r.scores["mamba_head_dim"][i]), S.norm(dim=0), **close)
        torch.testing.assert_close(f64(r.scores["mamba_heads"][i]), S.norm(dim=1), **close)
    assert r.hidden == ranked(ref["hidden"]) and r.meta["tokens"] == 2 * 2 * 16
    # hooks are gone afterwards
    assert not any(m._forward_hooks for m in model.modules())


def test_hooks_are_removed_when_a_pass_fails():
    model = make("grouped")
    bad = torch.full((1, 4), model.config.vocab_size + 5)  # out-of-range token -> the embedding raises
    with pytest.raises(IndexError):
        activation_scores(model, [bad])
    assert not any(m._forward_hooks for m in model.modules())


def test_grouped_orders_and_mamba_top_channels():
    assert ranked(torch.tensor([1.0, 3.0, 2.0, 0.0, 5.0, 5.0]), groups=2) == [1, 2, 0, 4, 5, 3]  # ties: lower first
    S = torch.tensor([[10.0, 0.0, 1.0], [0.0, 9.0, 1.0], [3.0, 3.0, 4.0]])  # (H=3, P=3)
    heads, chans = mamba_scores(S)
    torch.testing.assert_close(chans, S.norm(dim=0))
    torch.testing.assert_close(heads, S.norm(dim=1))
    heads1, _ = mamba_scores(S, top_channels=1)  # best channel: 0 (norm sqrt(109))
    torch.testing.assert_close(heads1, S[:, 0])


@pytest.mark.parametrize("name", ["tiny", "grouped"])
def test_permuted_parent_ranks_in_index_order(name):
    model = make(name)
    cfg = model.config
    batches = calib(cfg, length=24)
    r = compute_ranking(model, batches, depth_method="random")
    permute_(model, r)
    after = compute_ranking(model, batches, depth_method="random")

    def check(new, old, order, groups=1):
        new, old = f64(new), f64(old)
        torch.testing.assert_close(new, old[order], rtol=1e-4, atol=1e-6)  # scores travel with their index
        per = new.view(groups, -1)
        assert (per[:, 1:] <= per[:, :-1] * (1 + 1e-5) + 1e-9).all(), per  # non-increasing (in each group)

    check(after.scores["hidden"], r.scores["hidden"], r.hidden)
    for i in r.ffn:
        check(after.scores["ffn"][i], r.scores["ffn"][i], r.ffn[i])
    for i in r.attn_heads:
        check(after.scores["attn_heads"][i], r.scores["attn_heads"][i], r.attn_heads[i], cfg.num_query_groups)
    for i in r.mamba_heads:
        check(after.scores["mamba_heads"][i], r.scores["mamba_heads"][i], r.mamba_heads[i], cfg.mamba_num_groups)
        check(after.scores["mamba_head_dim"][i], r.scores["mamba_head_dim"][i], r.mamba_head_dim[i])


def test_known_structure_is_found():
    model = make("grouped")
    cfg = model.config
    P, di = cfg.mamba_head_dim, cfg.mamba_d_inner
    with torch.no_grad():
        up = model.layers[2].mixer.up_proj
        dead = [3, 17, 30]
        up.weight[dead] = 0
        up.bias[dead] = 0
        model.embedding.weight[:, 11] *= 30  # a loud residual channel
        q = model.layers[1].mixer.q_proj
        q.weight[4 * cfg.head_dim : 5 * cfg.head_dim] = 0  # query head 4 (KV group 2: heads 4, 5)
        inp = model.layers[0].mixer.in_proj
        rows = di + torch.arange(P) + 1 * P  # x rows of Mamba head 1 (group 0: heads 0, 1)
        inp.weight[rows] = 0
        inp.bias[rows] = 0
        chan_rows = di + torch.arange(cfg.mamba_num_heads) * P + 2  # channel 2 of every head, layer 3
        model.layers[3].mixer.in_proj.weight[chan_rows] = 0
        model.layers[3].mixer.in_proj.bias[chan_rows] = 0
    r = compute_ranking(model, calib(cfg), depth_method="random")
    assert sorted(r.ffn[2][-3:]) == dead and all(r.scores["ffn"][2][i] == 0 for i in dead)
    assert r.hidden[0] == 11
    assert r.attn_heads[1][5] == 4 and r.scores["attn_heads"][1][4] == 0
    assert r.mamba_heads[0][1] == 1 and r.scores["mamba_heads"][0][1] == 0
    assert r.mamba_head_dim[3][-1] == 2 and r.scores["mamba_head_dim"][3][2] == 0


@pytest.mark.parametrize("method", ["iterative-mse", "block-influence"])
def test_layers_without_output_are_removed_first(method):
    model = small_model()
    with torch.no_grad():
        model.layers[2].mixer.o_proj.weight.zero_()  # attention layer adds nothing
        model.layers[3].mixer.down_proj.weight.zero_()  # MLP layer adds nothing
    r = compute_ranking(model, calib(model.config), depth_method=method)
    assert sorted(r.depth[:2]) == [2, 3], r.depth
    assert sorted(r.depth) == list(range(6))
    if method == "iterative-mse":
        assert r.scores["depth"][:2] == [0.0, 0.0]
        assert r.depth[:2] == [2, 3]  # ties: lower index first
        assert min(r.scores["depth"][2:]) > 1e-3
        assert len(r.scores["depth_steps"]) == 6 and len(r.scores["depth_steps"][0]) == 6
    else:
        assert max(r.scores["depth"][:2]) < 1e-6 < min(r.scores["depth"][2:])


def test_iterative_mse_first_step_matches_sliced_children():
    model = small_model(seed=4)
    batches = calib(model.config, n=1)
    r = compute_ranking(model, batches, depth_method="iterative-mse")
    tokens = batches[0]
    with torch.no_grad():
        full = model(tokens).double()
        for j, score in r.scores["depth_steps"][0].items():
            child = extract(model, homogeneous(model.config, drop_layers=(j,)))
            expected = ((full - child(tokens).double()) ** 2).sum() / (full**2).sum()
            assert score == pytest.approx(expected.item(), rel=1e-3, abs=1e-7), j
    first = r.depth[0]
    assert r.scores["depth"][0] == min(r.scores["depth_steps"][0].values()) == r.scores["depth_steps"][0][first]
    # step 2 is scored with the first layer already removed
    assert first not in r.scores["depth_steps"][1] and len(r.scores["depth_steps"][1]) == 5


def test_random_depth_is_deterministic_by_seed():
    assert depth_random(12, 5) == depth_random(12, 5)
    assert len({tuple(depth_random(12, s)) for s in range(4)}) == 4
    model = small_model()
    a = compute_ranking(model, calib(model.config, n=1), depth_method="random", seed=3)
    b = compute_ranking(model, calib(model.config, n=1), depth_method="random", seed=3)
    assert a.depth == b.depth == depth_random(6, 3) and sorted(a.depth) == list(range(6))
    assert a == b  # width orders and scores too


def test_ranking_round_trip_and_report():
    model = small_model()
    r = compute_ranking(model, calib(model.config), depth_method="iterative-mse")
    text = json.dumps(r.to_dict(), allow_nan=False)
    back = Ranking.from_dict(json.loads(text))
    assert back == r
    back.check(model.config)
    report = r.report(model.config)
    for needle in ("# Importance ranking", "## Hidden channels (32)", "### Layer 2 (attention)",
                   "- group 1:", "## Depth (iterative-mse)", f"| 1 | {r.depth[0]} |"):  # fmt: skip
        assert needle in report, needle
    assert f"{r.hidden[0]} (" in report.split("## Hidden channels")[1].split("\n")[2]
    with pytest.raises(ConfigError, match="not a ranking"):
        Ranking.from_dict({"format": "something-else"})
    broken = r.to_dict()
    del broken["ffn"]
    with pytest.raises(ConfigError, match="malformed"):
        Ranking.from_dict(broken)


def test_bad_inputs():
    model = small_model()
    with pytest.raises(ConfigError, match="depth method 'shortest'"):
        compute_ranking(model, calib(model.config), depth_method="shortest")
    with pytest.raises(ConfigError, match="no calibration batches"):
        compute_ranking(model, [], depth_method="random")
    assert DEPTH_METHODS == cli.DEPTH_METHODS == ("iterative-mse", "block-influence", "random")
    with pytest.raises(ConfigError, match="cannot drop"):
        Ranking.identity(model.config).layers_to_drop(6)
