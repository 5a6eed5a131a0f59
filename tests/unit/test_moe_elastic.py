"""Elastic axes of mixture-of-experts ('E') layers: routed experts (group-aware), expert FFN width,
shared-expert width and top-k. Masked parent == sliced child on every axis (homogeneous and per
layer), exact zero gradients for what a mask drops, a function-preserving permutation of experts and
neurons, expert importance against a per-token reference, and the parameter counts of children."""

import random

import pytest
import torch
from helpers import check_masked_equals_sliced, random_arch
from reference import randomize_

from megatron_elastic.elastic import hard_state, homogeneous
from megatron_elastic.elastic.importance import Ranking, compute_ranking
from megatron_elastic.elastic.permute import permute_
from megatron_elastic.elastic.space import Architecture, LayerArch, child_config, full_architecture
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, num_parameters
from megatron_elastic.model.config import active_parameters, moe_parameters, preset
from megatron_elastic.model.moe import update_expert_bias

TOL = 2e-5


def moe_config(**kw) -> HybridConfig:
    spec = dict(pattern="ME*E-", vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_attention_heads=6,
                num_query_groups=2, head_dim=8, mamba_num_heads=8, mamba_head_dim=8, mamba_num_groups=2,
                mamba_state_dim=8, num_moe_experts=12, moe_router_topk=3, moe_ffn_hidden_size=24,
                moe_shared_expert_intermediate_size=40, moe_router_num_groups=2, moe_router_group_topk=1,
                moe_router_topk_scaling_factor=1.5)  # fmt: skip
    spec.update(kw)
    return HybridConfig(**spec)


def random_parent(cfg: HybridConfig, seed: int = 3) -> HybridLM:
    torch.manual_seed(0)
    model = randomize_(HybridLM(cfg), seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    for block in model.layers:
        if block.layer_type == "E":  # a bias large enough to change some choices
            block.mixer.gate.e_score_correction_bias.copy_(0.3 * torch.randn(cfg.num_moe_experts, generator=gen))
    return model


@pytest.fixture(scope="module", params=[0, 16], ids=["residual", "latent"])
def parent(request):
    return random_parent(moe_config(moe_latent_size=request.param))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))


def check(parent, arch, tokens):
    return check_masked_equals_sliced(parent, arch, tokens, TOL)


@pytest.mark.parametrize("kw", [dict(moe_experts=8), dict(moe_experts=4), dict(moe_ffn=10), dict(moe_shared_ffn=7),
                                dict(moe_topk=1),
                                dict(hidden=24, moe_experts=6, moe_ffn=16, moe_shared_ffn=20, drop_layers=(2,))],
                         ids=["experts8", "experts4", "ffn", "shared", "topk", "all"])  # fmt: skip
def test_homogeneous_masked_equals_sliced(parent, tokens, kw):
    arch = homogeneous(parent.config, **kw)
    child, masked = check(parent, arch, tokens)
    c = child.config
    assert c.num_moe_experts == kw.get("moe_experts", 12)
    assert c.moe_ffn_hidden_size == kw.get("moe_ffn", 24)
    assert c.moe_shared_expert_intermediate_size == kw.get("moe_shared_ffn", 40)
    # the parent's top-k (3) stays unless asked or unless it exceeds the kept experts of one group
    assert c.moe_router_topk == kw.get("moe_topk", min(3, kw.get("moe_experts", 12) // 2))
    assert not c.is_heterogeneous
    with torch.no_grad():
        full = parent(tokens)
    assert (full - masked).abs().max() > 1e-2  # the cut changed the function


@pytest.mark.parametrize("seed", range(3))
def test_heterogeneous_masked_equals_sliced(parent, tokens, seed):
    arch = random_arch(parent.config, random.Random(seed))
    child, _ = check(parent, arch, tokens)
    moe_kept = [layer for layer in arch.layers if layer.keep and layer.kind == "E"]
    for j, layer in enumerate(moe_kept):
        d = child.config.layer_dims([i for i, k in enumerate(child.config.layer_types) if k == "E"][j])
        assert (d.num_moe_experts, d.moe_ffn_hidden_size, d.moe_shared_expert_intermediate_size, d.moe_router_topk) == \
            (layer.num_moe_experts, layer.moe_ffn_hidden_size, layer.moe_shared_expert_intermediate_size,
             layer.moe_router_topk)  # fmt: skip


def test_masked_router_never_picks_a_dropped_expert(parent):
    router = parent.layers[1].mixer.gate
    mask = torch.tensor([1.0] * 3 + [0.0] * 3 + [1.0] * 3 + [0.0] * 3)
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(1))
    _, _, indices = router(x, mask)
    assert set(indices.unique().tolist()) <= {0, 1, 2, 6, 7, 8}
    _, _, full = router(x)
    assert set(full.unique().tolist()) - {0, 1, 2, 6, 7, 8}  # without the mask the others are picked


def test_masked_out_experts_and_neurons_get_exactly_zero_gradient(tokens):
    model = random_parent(moe_config()).train()
    arch = homogeneous(model.config, moe_experts=6, moe_ffn=10, moe_shared_ffn=25)
    model(tokens, elastic=hard_state(model.config, arch)).square().mean().backward()
    for i in (1, 3):
        m = model.layers[i].mixer
        dropped = torch.tensor([3, 4, 5, 9, 10, 11])  # a prefix of 3 inside each group of 6 is kept
        for g in (m.experts.up_proj.grad, m.experts.down_proj.grad, m.gate.weight.grad):
            assert g is not None and g.abs().sum() > 0
            assert torch.equal(g[dropped], torch.zeros_like(g[dropped]))
        assert torch.equal(m.experts.up_proj.grad[:, 10:], torch.zeros_like(m.experts.up_proj.grad[:, 10:]))
        assert torch.equal(m.experts.down_proj.grad[:, :, 10:], torch.zeros_like(m.experts.down_proj.grad[:, :, 10:]))
        assert m.experts.up_proj.grad[:3, :10].abs().sum() > 0
        shared = m.shared_experts
        assert torch.equal(shared.up_proj.weight.grad[25:], torch.zeros_like(shared.up_proj.weight.grad[25:]))
        assert torch.equal(shared.down_proj.weight.grad[:, 25:], torch.zeros_like(shared.down_proj.weight.grad[:, 25:]))


def test_balanced_load_counts_only_the_kept_experts():
    model = random_parent(moe_config()).train()
    arch = homogeneous(model.config, moe_experts=6)
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.enable_grad():
        model(tokens, elastic=hard_state(model.config, arch))
    router = model.layers[1].mixer.gate
    slots = 20 * 3
    kept = torch.tensor([1.0] * 3 + [0.0] * 3 + [1.0] * 3 + [0.0] * 3)
    torch.testing.assert_close(router.balanced_load, kept * slots / 6)
    load = router.tokens_per_expert.clone()
    assert load.sum() == slots and load[kept == 0].sum() == 0
    before = router.e_score_correction_bias.clone()
    update_expert_bias(model, 1e-3)
    step = router.e_score_correction_bias - before
    torch.testing.assert_close(step[kept == 0], torch.zeros(6))  # a dropped expert is not pushed up
    torch.testing.assert_close(step[kept == 1], 1e-3 * torch.sign(slots / 6 - load[kept == 1]))


def test_permutation_of_experts_and_neurons_preserves_the_function(tokens):
    cfg = moe_config(moe_latent_size=16)
    model = random_parent(cfg)
    with torch.no_grad():
        before = model(tokens)
    gen = torch.Generator().manual_seed(5)
    ranking = Ranking.identity(cfg)
    for i in (1, 3):
        ranking.moe_experts[i] = (torch.cat([torch.randperm(6, generator=gen), 6 + torch.randperm(6, generator=gen)])).tolist()
        ranking.moe_ffn[i] = torch.randperm(24, generator=gen).tolist()
        ranking.moe_shared_ffn[i] = torch.randperm(40, generator=gen).tolist()
    ranking.hidden = torch.randperm(32, generator=gen).tolist()
    order = list(ranking.moe_experts[1])
    bias = model.layers[1].mixer.gate.e_score_correction_bias.clone()
    permute_(model, ranking)
    with torch.no_grad():
        after = model(tokens)
    torch.testing.assert_close(after, before, rtol=0, atol=TOL)
    torch.testing.assert_close(model.layers[1].mixer.gate.e_score_correction_bias, bias[order])
    ranking.moe_experts[1] = [6] + list(range(1, 6)) + [0] + list(range(7, 12))
    with pytest.raises(ConfigError, match="inside their group"):
        permute_(model, ranking)


def reference_expert_scores(model: HybridLM, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """Token by token: the summed L2 norm of each expert's weighted output (float64)."""
    captured = {}
    block = model.layers[layer]
    handle = block.mixer.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    m = block.mixer
    x = captured["x"].reshape(-1, model.config.hidden_size)
    _, weights, indices = m.gate(x)
    up, down = m.experts.up_proj.double(), m.experts.down_proj.double()
    scores = torch.zeros(m.experts.num_experts, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            y = down[e] @ torch.relu(up[e] @ x[t].double()).square()
            scores[e] += (weights[t, k].double() * y).norm()
    return scores


def test_expert_importance_is_routing_frequency_times_output_magnitude(tokens):
    model = random_parent(moe_config())
    ranking = compute_ranking(model, [tokens], depth_method="random")
    ref = reference_expert_scores(model, 1, tokens)
    got = torch.tensor(ranking.scores["moe_experts"][1], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
    assert (ref == 0).sum() < 12 and ref.max() > 0
    for g in range(2):  # ranked inside each routing group, best first
        block = ranking.moe_experts[1][6 * g : 6 * (g + 1)]
        assert sorted(block) == list(range(6 * g, 6 * (g + 1)))
        assert [ref[e].item() for e in block] == sorted((ref[e].item() for e in block), reverse=True)
    assert len(ranking.moe_ffn[3]) == 24 and len(ranking.moe_shared_ffn[3]) == 40
    # permuting by the ranking then keeping a prefix keeps the best experts of each group
    permute_(model, ranking)
    after = reference_expert_scores(model, 1, tokens)
    torch.testing.assert_close(after, ref[torch.tensor(ranking.moe_experts[1])], rtol=1e-4, atol=1e-9)
    assert Ranking.from_dict(ranking.to_dict()).moe_experts == ranking.moe_experts


@pytest.mark.parametrize("kw,needle", [
    (dict(moe_experts=5), "not divisible by the 2 groups"),
    (dict(moe_experts=2), "fewer than 2 experts in each of the 2 routing groups"),
    (dict(moe_experts=14), "exceeds the parent's 12"),
    (dict(moe_experts=4, moe_topk=3), "a token can reach 2 of them"),
    (dict(moe_ffn=30), "exceeds the parent's 24"),
])  # fmt: skip
def test_infeasible_moe_architectures(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        homogeneous(moe_config(), **kw)


def test_child_parameter_counts_total_and_active():
    cfg = moe_config()
    arch = homogeneous(cfg, moe_experts=8, moe_ffn=16, moe_shared_ffn=20, moe_topk=2)
    child = child_config(cfg, arch)
    d = cfg.hidden_size
    per_layer_total = 8 * d + 8 * 2 * d * 16 + 2 * d * 20  # router rows, experts, shared expert
    assert moe_parameters(child)["total"] == per_layer_total
    assert moe_parameters(child)["active"] == 8 * d + 2 * 2 * d * 16 + 2 * d * 20
    dense = sum(num_parameters(cfg).values()) - 2 * moe_parameters(cfg)["total"]
    assert sum(num_parameters(child).values()) == dense + 2 * per_layer_total
    assert active_parameters(child) == dense + 2 * moe_parameters(child)["active"]
    assert sum(p.numel() for p in HybridLM(child, init=False).parameters()) == dense + 2 * per_layer_total


def test_heterogeneous_child_config_round_trips():
    cfg = moe_config()
    layers = list(full_architecture(cfg).layers)
    layers[1] = LayerArch(kind="E", num_moe_experts=8, moe_ffn_hidden_size=12, moe_shared_expert_intermediate_size=40,
                          moe_router_topk=2)  # fmt: skip
    arch = Architecture(hidden_size=32, layers=tuple(layers))
    child = child_config(cfg, arch)
    assert child.num_moe_experts_per_layer == [8, 12] and child.moe_router_topk_per_layer == [2, 3]
    assert HybridConfig.from_dict(child.to_dict()) == child
    assert Architecture.from_dict(arch.to_dict()) == arch
    assert active_parameters(child) == sum(num_parameters(child).values()) - (8 - 2) * 2 * 32 * 12 - (12 - 3) * 2 * 32 * 24


def test_active_parameters_hand_count():
    c = preset("tiny-moe")
    d, f = c.hidden_size, c.moe_ffn_hidden_size
    unused_per_layer = (c.num_moe_experts - c.moe_router_topk) * 2 * c.moe_expert_input_size * f
    n_moe = c.layer_types.count("E")
    assert n_moe == 2 and unused_per_layer > 0 and d > 0
    assert active_parameters(c) == sum(num_parameters(c).values()) - n_moe * unused_per_layer
    assert moe_parameters(c)["active"] < moe_parameters(c)["total"]


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_costs_at_one_hot_are_the_child_counts(heterogeneous):
    from megatron_elastic.elastic.costs import Cost, one_hot, params
    from megatron_elastic.elastic.search_space import ElasticSpace

    cfg = moe_config()
    sp = ElasticSpace(cfg, hidden=[1.0, 0.75], moe_experts=[1.0, 0.5, 0.34], moe_ffn=[1.0, 0.5],
                      moe_shared_ffn=[1.0, 0.5], depth=[1.0, 0.8], heterogeneous=heterogeneous)  # fmt: skip
    assert sp.choices("moe_experts") == (12, 6, 4)
    rng = random.Random(1)
    for _ in range(30):
        idx = {a: ([rng.randrange(len(sp.choices(a))) for _ in sp.layer_indices(a)] if sp.is_per_layer(a)
                   else rng.randrange(len(sp.choices(a)))) for a in sp.axes}  # fmt: skip
        child = child_config(cfg, sp.architecture(idx))
        p = one_hot(sp, idx, torch.float64)
        assert params(sp, p).item() == sum(num_parameters(child).values())
        assert params(sp, p, active=True).item() == active_parameters(child)
    assert Cost(sp, "active_params").full == active_parameters(cfg)


@pytest.mark.parametrize("groups", [1, 2], ids=["ungrouped", "grouped"])
def test_view_child_holds_views_of_the_parents_experts(tokens, groups):
    """A view child of an MoE parent computes what the extracted child computes, and its routed experts are
    views of the parent's stacked tensors: one 3-D view for a prefix of all experts, per-expert 2-D views
    for a prefix inside every routing group."""
    from torch import nn

    from megatron_elastic.elastic import extract
    from megatron_elastic.inference.elastic_model import view_child

    cfg = moe_config(moe_router_num_groups=groups, moe_latent_size=16 if groups == 1 else 0)
    parent = random_parent(cfg)
    arch = homogeneous(cfg, hidden=24, moe_experts=6, moe_ffn=16, moe_shared_ffn=20)
    view, copied = view_child(parent, arch)
    copy = extract(parent, arch).eval()
    with torch.no_grad():
        ref = copy(tokens)
        torch.testing.assert_close(view(tokens), ref, rtol=0, atol=TOL)
    assert ref.abs().max() > 0.5
    owned = {t.untyped_storage().data_ptr() for t in parent.parameters()}
    for i in (1, 3):
        experts, kept = view.layers[i].mixer.experts, (slice(0, 6) if groups == 1 else [0, 1, 2, 6, 7, 8])
        for name in ("up_proj", "down_proj"):
            stacked = getattr(experts, name)
            assert isinstance(stacked, nn.ParameterList) == (groups > 1)
            assert all(stacked[e].untyped_storage().data_ptr() in owned for e in range(6))
            full = getattr(parent.layers[i].mixer.experts, name)[kept]
            inner = slice(None) if cfg.moe_latent_size else slice(0, 24)  # the latent space is not cut
            expected = full[:, :16, inner] if name == "up_proj" else full[:, inner, :16]
            torch.testing.assert_close(torch.stack([stacked[e] for e in range(6)]), expected, rtol=0, atol=0)
        bias = parent.layers[i].mixer.gate.e_score_correction_bias[kept]
        torch.testing.assert_close(view.layers[i].mixer.gate.e_score_correction_bias, bias, rtol=0, atol=0)
    matrices = sum(t.numel() * t.element_size() for t in view.parameters() if t.dim() >= 2)
    assert copied < 0.05 * matrices  # only the routers' rows and small vectors are gathered
