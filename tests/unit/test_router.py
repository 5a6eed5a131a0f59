"""The search space and the router: sizes from fractions, one-line errors, persistence; Gumbel
sampling reproducible from a seed; hard masks that compute exactly the argmax architecture while
passing gradients to the router; soft masks in [0, 1] and nested; and a router trained on the
cost alone lands every budget inside its tolerance."""

import json
import warnings

import pytest
import torch
from reference import randomize_

from megatron_elastic.elastic import hard_state
from megatron_elastic.elastic.costs import Cost, one_hot
from megatron_elastic.elastic.router import Router, router_param_group, scale_at, tau_at
from megatron_elastic.elastic.search_space import ElasticSpace
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, num_parameters, preset

PARENT = dict(
    pattern="M*-M-*M", vocab_size=101, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6,
    num_query_groups=2, head_dim=10, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=2,
    mamba_state_dim=4, mamba_chunk_size=8, mlp_bias=True, mamba_proj_bias=True,
)  # fmt: skip
FRACTIONS = dict(hidden=[1.0, 0.75, 0.5], ffn=[1.0, 0.5, 0.25], attn_heads=[1.0, 2 / 3, 1 / 3],
                 mamba_heads=[1.0, 0.5, 0.25], mamba_head_dim=[1.0, 0.5], depth=[1.0, 0.75, 0.5])  # fmt: skip
BUDGETS = [1.0, 0.75, 0.5]


@pytest.fixture(autouse=True)
def one_thread():
    # Hundreds of steps on tensors of a few elements: waking a second intra-op thread costs more
    # than the work (10x slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parent():
    return randomize_(HybridLM(HybridConfig(**PARENT)), seed=3).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- the search space
def test_fractions_become_aligned_nested_sizes():
    cfg = preset("tiny")  # hidden 128, ffn 384, 4 heads / 2 KV groups, 8 Mamba heads / 2 groups x 32, 7 layers
    with pytest.warns(UserWarning, match=r"mamba_head_dim: fractions \[1.0, 0.75, 0.5\] give the sizes \[32, 16, 16\]"):
        sp = ElasticSpace(cfg, hidden=[1.0, 0.875, 0.75, 0.5], ffn=[1.0, 0.7, 0.5, 0.25], attn_heads=[1.0, 0.5],
                          mamba_heads=[1.0, 0.75, 0.5, 0.1], mamba_head_dim=[1.0, 0.75, 0.5], depth=[1.0, 0.875, 0.75],
                          multiple_of=16)  # fmt: skip
    assert {a: list(ax.choices) for a, ax in sp.axes.items()} == {
        "hidden": [128, 112, 96, 64], "ffn": [384, 256, 192, 96], "attn_heads": [4, 2],
        "mamba_heads": [8, 6, 4, 2],  # 0.1 * 8 rounds to 0: one head per group is the floor
        "mamba_head_dim": [32, 16], "depth": [7, 6, 5],
        "moe_experts": [1], "moe_ffn": [1], "moe_shared_ffn": [1],  # no MoE layer: the parent's placeholder only
    }  # fmt: skip
    assert sp.axes["mamba_heads"].groups == 2 and sp.axes["attn_heads"].groups == 2
    assert sp.rounding() == [  # said at start-up: what each inexact fraction became
        "elastic.ffn 0.7 -> 256 of 384 (268.8 rounded to a multiple of 16: elastic.multiple_of=16)",
        "elastic.mamba_heads 0.1 -> 2 of 8 (0.8 rounded to a multiple of 2: whole Mamba groups (2))",
        "elastic.mamba_head_dim 0.75 -> 16 of 32 (24 rounded to a multiple of 16: elastic.multiple_of=16)",
    ]
    assert ElasticSpace.from_sizes(cfg, {"ffn": [384, 256]}).rounding() == []
    assert sp.depth_order == [6, 5, 4, 3, 2, 1, 0]  # no ranking: the last layer goes first
    assert [sp.dropped_layers(c) for c in range(3)] == [[], [6], [5, 6]]
    # heads x head_dim stays a multiple of multiple_of: with 64, attention heads move in steps of 4.
    with pytest.warns(UserWarning, match="attn_heads"):
        assert ElasticSpace(cfg, attn_heads=[1.0, 0.5], multiple_of=64).choices("attn_heads") == (4,)


def test_protect_attention_and_depth_order():
    cfg = preset("tiny")  # M - M * - M -
    sp = ElasticSpace(cfg, depth=[1.0, 0.5, 0.1], depth_order=[3, 0, 6, 1, 2, 4, 5], protect_attention=True)
    assert sp.choices("depth") == (7, 3, 1)  # 0.1 x 7 rounds to 0: the one attention layer is the floor
    assert sp.removal_order == [0, 6, 1, 2, 4, 5]
    for c in range(len(sp.choices("depth"))):
        assert 3 not in sp.dropped_layers(c)
    assert sp.dropped_layers(1) == [0, 1, 2, 6]
    with pytest.raises(ConfigError, match="protect_attention keeps attention heads whole; set attn_heads to \\[1.0\\]"):
        ElasticSpace.from_sizes(cfg, {"attn_heads": [4, 2]}, protect_attention=True)
    assert ElasticSpace(cfg, attn_heads=[1.0, 0.5], protect_attention=True).choices("attn_heads") == (4,)


def test_architecture_from_choice_indices():
    cfg = HybridConfig(**PARENT)  # M * - M - * M
    hom = ElasticSpace(cfg, **FRACTIONS)
    arch = hom.architecture(dict(hidden=1, ffn=2, attn_heads=1, mamba_heads=2, mamba_head_dim=1, depth=1))
    assert arch.hidden_size == 36 and arch.kept_layers() == [0, 1, 2, 3, 4]
    sizes = {(layer.kind, layer.ffn_hidden_size, layer.num_attention_heads, layer.mamba_num_heads, layer.mamba_head_dim)
             for layer in arch.layers}  # fmt: skip
    assert sizes == {("M", None, None, 2, 3), ("*", None, 4, None, None), ("-", 16, None, None, None)}
    het = ElasticSpace(cfg, **FRACTIONS, heterogeneous=True)
    assert het.prob_shape("ffn") == (2, 3) and het.prob_shape("mamba_heads") == (3, 3)
    assert het.prob_shape("hidden") == (3,) and hom.prob_shape("ffn") == (3,)
    arch = het.architecture(dict(ffn=[0, 2], mamba_heads=[2, 1, 0], mamba_head_dim=1, attn_heads=[1, 2]))
    assert [layer.ffn_hidden_size for layer in arch.layers if layer.kind == "-"] == [64, 16]
    assert [layer.mamba_num_heads for layer in arch.layers if layer.kind == "M"] == [2, 4, 8]
    assert [layer.mamba_head_dim for layer in arch.layers if layer.kind == "M"] == [3, 3, 3]
    assert [layer.num_attention_heads for layer in arch.layers if layer.kind == "*"] == [4, 2]
    for bad, needle in [(dict(ffn=[0]), "ffn has 1 choice indices for 2 layers"), (dict(ffn=[0, 3]), "out of range"),
                        (dict(hidden=[0]), "must be one int"), (dict(width=0), "unknown axis 'width'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            het.architecture(bad)
    with pytest.raises(ConfigError, match="must be one int"):
        hom.architecture(dict(ffn=[0, 1]))


def test_round_trip_through_json():
    cfg = HybridConfig(**PARENT)
    sp = ElasticSpace(cfg, **FRACTIONS, heterogeneous=True, multiple_of=2, depth_order=[2, 6, 0, 4, 1, 5, 3],
                      protect_attention=False)  # fmt: skip
    back = ElasticSpace.from_dict(json.loads(json.dumps(sp.to_dict(), allow_nan=False)))
    assert back.axes == sp.axes and back.depth_order == sp.depth_order and back.heterogeneous
    assert back.fractions == sp.fractions and back.multiple_of == 2
    idx = dict(ffn=[1, 2], depth=2, hidden=1)
    assert back.architecture(idx) == sp.architecture(idx)
    back.check_parent(cfg)
    data = sp.to_dict()
    data["sizes"]["mamba_heads"] = [8, 5]
    with pytest.raises(ConfigError, match="mamba_heads size 5 is not divisible by the 2 groups"):
        ElasticSpace.from_dict(data)
    with pytest.raises(ConfigError, match="elastic space data is malformed"):
        ElasticSpace.from_dict({"parent": cfg.to_dict()})


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(ffn=[1.0, 1.2]), "elastic.ffn contains 1.2; every entry must be a fraction in (0, 1]"),
        (dict(hidden=[1.0, 0.0]), "elastic.hidden contains 0.0"),
        (dict(depth=[1.0, -0.5]), "elastic.depth contains -0.5"),
        (dict(ffn=[0.5, 1.0]), "elastic.ffn=[0.5, 1.0] must be unique and sorted largest first (nested sizes)"),
        (dict(mamba_heads=[1.0, 0.5, 0.5]), "must be unique and sorted largest first"),
        (dict(mamba_heads=[0.75, 0.5]), "elastic.mamba_heads=[0.75, 0.5] must start with 1.0 (the parent's own size)"),
        (dict(attn_heads=[]), "elastic.attn_heads=[] is invalid; give a list of fractions"),
        (dict(hidden=[1.0, 0.5], multiple_of=64), "smaller than the alignment unit 64 (from multiple_of=64)"),
        (dict(multiple_of=0), "elastic.multiple_of=0 is invalid"),
        (dict(depth_order=[0, 1, 2]), "depth_order [0, 1, 2] is not a permutation of the parent's layers 0..6"),
    ],
)
def test_space_errors_name_the_fix(kw, needle):
    with pytest.raises(ConfigError) as err:
        ElasticSpace(HybridConfig(**PARENT), **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "sizes,needle",
    [
        (dict(mamba_heads=[8, 5]), "mamba_heads size 5 is not divisible by the 2 groups"),
        (dict(attn_heads=[6, 3]), "attn_heads size 3 is not divisible by the 2 groups"),
        (dict(ffn=[64, 80]), "ffn size 80 exceeds the parent's 64"),
        (dict(ffn=[32, 64]), "must be unique and sorted largest first"),
        (dict(ffn=[48, 32]), "elastic.ffn sizes [48, 32] must start with the parent's size 64"),
        (dict(ffn=[64, 30]), "elastic.ffn size 30 is not a multiple of 4 (multiple_of=4)"),
        (dict(depth=[7, 0]), "depth size 0 is invalid"),
        (dict(widths=[1]), "unknown axis 'widths'"),
    ],
)
def test_explicit_sizes_are_validated(sizes, needle):
    with pytest.raises(ConfigError) as err:
        ElasticSpace.from_sizes(HybridConfig(**PARENT), sizes, multiple_of=4 if "ffn" in sizes else 1)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_mismatched_parent_and_heterogeneous_parent():
    sp = ElasticSpace(preset("tiny"), ffn=[1.0, 0.5])
    other = preset("tiny")
    other.hidden_size = 64
    with pytest.raises(ConfigError, match="parent with hidden_size=128 but the model has hidden_size=64; rebuild"):
        sp.check_parent(HybridConfig.from_dict(other.to_dict()))
    with pytest.raises(ConfigError, match="built for pattern 'M-M\\*-M-' but the model has 'M-M-'"):
        sp.check_parent(HybridConfig.from_dict(preset("tiny").to_dict() | {"pattern": "M-M-"}))
    het = HybridConfig(**(PARENT | dict(ffn_hidden_size_per_layer=[64, 32])))
    with pytest.raises(ConfigError, match="the elastic parent has per-layer sizes"):
        ElasticSpace(het)


# ---------------------------------------------------------------------- the router
def space(heterogeneous=False):
    return ElasticSpace(HybridConfig(**PARENT), **FRACTIONS, heterogeneous=heterogeneous)


def test_router_shapes_bounds_and_budget_errors():
    sp = space(heterogeneous=True)
    router = Router(sp, BUDGETS, hidden_size=32)
    logits = router.logits(2)
    assert {a: tuple(z.shape) for a, z in logits.items()} == {
        "hidden": (3,), "ffn": (2, 3), "attn_heads": (2, 3), "mamba_heads": (3, 3), "mamba_head_dim": (3, 2),
        "depth": (3,),
    }  # fmt: skip
    assert all(z.abs().max() <= 2.0 + 1e-6 for z in logits.values())  # bounded: scale / tau sets the sharpness
    assert not torch.equal(router.logits(0)["ffn"], logits["ffn"])
    with pytest.raises(ConfigError, match="must start with 1.0"):
        Router(sp, [0.75, 0.5])
    with pytest.raises(ValueError, match="budget index 3 is out of range"):
        router.logits(3)
    fixed = Router(ElasticSpace(HybridConfig(**PARENT), ffn=[1.0, 0.5]), BUDGETS)
    assert list(fixed.heads) == ["ffn"]  # single-choice axes have no head
    s = fixed.sample(1, tau=1.0, scale=1.0, generator=torch.Generator().manual_seed(0))
    assert s.state.hidden is None and all(m.mamba_heads is None and m.keep == 1.0 for m in s.state.layers)
    assert s.probs["hidden"].tolist() == [1.0]


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_sampling_is_reproducible_from_the_seed(mode):
    torch.manual_seed(0)
    router = Router(space(heterogeneous=True), BUDGETS, hidden_size=32)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [router.sample(b, tau=0.7, scale=2.0, mode=mode, generator=g) for b in (1, 2, 1)]

    a, b, c = draw(5), draw(5), draw(6)
    for x, y in zip(a, b):
        assert x.indices == y.indices and x.architecture == y.architecture
        for axis in x.probs:
            torch.testing.assert_close(x.probs[axis], y.probs[axis], rtol=0, atol=0)
    assert any(not torch.equal(x.probs["ffn"], z.probs["ffn"]) for x, z in zip(a, c))
    assert not torch.equal(a[0].probs["ffn"], a[2].probs["ffn"])  # the generator advances between draws
    for s in a:
        for p in s.probs.values():
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_hard_masks_compute_the_argmax_architecture_and_train_the_router(parent, tokens, heterogeneous):
    torch.manual_seed(1)
    router = Router(space(heterogeneous), BUDGETS, hidden_size=32)
    g = torch.Generator().manual_seed(11)
    dropped_seen = 0
    for _ in range(4):
        s = router.sample(2, tau=0.5, scale=1.0, mode="hard", generator=g)
        out = parent(tokens, elastic=s.state)
        with torch.no_grad():
            ref = parent(tokens, elastic=hard_state(parent.config, s.architecture))
        assert ref.abs().max() > 1.0
        # Hard masks are exact 0/1 values; only the full-size hidden mask (a tensor of ones here,
        # None in hard_state) reorders fp32 sums.
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
        for layer, arch_layer in zip(s.state.layers, s.architecture.layers):
            if not arch_layer.keep:
                assert type(layer.keep) is float and layer.keep == 0.0  # skipped, not multiplied by zero
                dropped_seen += 1
            elif torch.is_tensor(layer.keep):
                assert layer.keep.item() == 1.0 and layer.keep.requires_grad
        router.zero_grad()
        out.logsumexp(-1).mean().backward()
        for axis in ("hidden", "ffn", "attn_heads", "mamba_heads", "mamba_head_dim"):
            grads = [p.grad for p in router.heads[axis].parameters()]
            assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), axis
    assert dropped_seen > 0


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_soft_masks_are_nested_and_in_unit_interval(parent, tokens, heterogeneous):
    torch.manual_seed(2)
    sp = space(heterogeneous)
    router = Router(sp, BUDGETS, hidden_size=32)
    s = router.sample(1, tau=2.0, scale=1.0, mode="soft", generator=torch.Generator().manual_seed(3))

    def check(mask, axis, probs_row):
        ax = sp.axes[axis]
        per_group = mask.view(ax.groups, -1)
        assert mask.min() >= 0 and mask.max() <= 1 + 1e-6
        assert (per_group[:, 1:] <= per_group[:, :-1] + 1e-7).all()  # non-increasing inside each group
        assert (per_group[:, 0] - 1).abs().max() < 1e-6  # the smallest choice keeps at least one unit
        expected_size = probs_row.detach() @ torch.tensor(sp.choices(axis), dtype=torch.float32)
        torch.testing.assert_close(mask.sum(), expected_size)  # the soft mask's mass is the expected size
        assert 0 < mask.min() < 1 or len(sp.choices(axis)) == 1

    check(s.state.hidden, "hidden", s.probs["hidden"])
    nth = {"ffn": 0, "attn_heads": 0, "mamba_heads": 0, "mamba_head_dim": 0}
    for layer in s.state.layers:
        for axis in nth:
            mask = getattr(layer, axis)
            if mask is not None:
                p = s.probs[axis]
                check(mask, axis, p[nth[axis]] if sp.is_per_layer(axis) else p)
                nth[axis] += 1
        keep = layer.keep.detach() if torch.is_tensor(layer.keep) else layer.keep
        assert 0 <= float(keep) <= 1
    assert nth["ffn"] == 2 and nth["mamba_heads"] == 3
    keeps = [float(m.keep.detach()) if torch.is_tensor(m.keep) else m.keep for m in s.state.layers]
    assert keeps[:3] == [1.0, 1.0, 1.0] and 0 < min(keeps[3:]) < 1  # default order: the last layers go first
    out = parent(tokens, elastic=s.state)
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.heads["depth"].parameters())


def test_argmax_architecture_has_no_noise():
    torch.manual_seed(3)
    sp = space(heterogeneous=True)
    router = Router(sp, BUDGETS, hidden_size=32)
    logits = router.logits(1)
    idx = router.argmax_indices(1)
    assert idx["ffn"] == logits["ffn"].argmax(-1).tolist() and idx["hidden"] == int(logits["hidden"].argmax())
    assert router.argmax_architecture(1) == sp.architecture(idx)
    # With a very sharp scale / tau the Gumbel noise no longer matters: samples are the argmax.
    s = router.sample(1, tau=1e-3, scale=1e4, generator=torch.Generator().manual_seed(0))
    assert s.indices == idx


def test_schedules():
    assert tau_at(0, 100) == 1.0 and tau_at(100, 100) == pytest.approx(0.05) and tau_at(500, 100) == pytest.approx(0.05)
    assert tau_at(50, 100) == pytest.approx(0.05**0.5)
    assert tau_at(50, 100, kind="linear") == pytest.approx(0.525)
    assert tau_at(50, 100, kind="cosine") == pytest.approx(0.525)
    assert tau_at(25, 100, kind="cosine") > tau_at(25, 100, kind="linear")
    assert scale_at(0, 10) == 1.0 and scale_at(5, 10) == 5.5 and scale_at(10, 10) == 10.0 and scale_at(20, 10) == 10.0
    with pytest.raises(ValueError, match="tau schedule 'step' is unknown"):
        tau_at(1, 10, kind="step")


def test_router_parameter_group():
    router = Router(space(), BUDGETS, hidden_size=16)
    model = torch.nn.Linear(2, 2)
    group = router_param_group(router, model_lr=1e-4)
    assert group["lr"] == pytest.approx(1e-2) and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in router.parameters()}
    opt = torch.optim.AdamW([{"params": model.parameters()}, group], lr=1e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, pytest.approx(1e-2)]


# ---------------------------------------------------------------------- the key test
@pytest.mark.parametrize("heterogeneous", [False, True])
def test_router_trained_on_the_cost_meets_every_budget(heterogeneous):
    """300 Adam steps (lr 1e-2) on the router loss alone, tau 1 -> 0.05, scale 1 -> 10: the noise-free
    argmax architecture of every budget lands within the 5% tolerance of its parameter budget."""
    cfg = preset("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.875 x 8 Mamba heads rounds onto 0.75's size
        sp = ElasticSpace(cfg, hidden=[1.0, 0.875, 0.75, 0.625, 0.5], ffn=[1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25],
                          attn_heads=[1.0, 0.5], mamba_heads=[1.0, 0.75, 0.5], mamba_head_dim=[1.0, 0.875, 0.75],
                          depth=[1.0, 0.875, 0.75], heterogeneous=heterogeneous)  # fmt: skip
    cost = Cost(sp, "params")
    assert cost.full == sum(num_parameters(cfg).values())
    torch.manual_seed(0)
    router = Router(sp, BUDGETS)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    steps = 300
    for step in range(steps):
        tau, scale = tau_at(step, steps), scale_at(step, steps)
        loss = sum(cost.loss(router.sample(b, tau=tau, scale=scale, generator=g).probs, budget)
                   for b, budget in enumerate(BUDGETS))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    for b, budget in enumerate(BUDGETS):
        idx = router.argmax_indices(b)
        fraction = cost.fraction(one_hot(sp, idx, torch.float64)).item()
        assert abs(fraction / budget - 1) <= 0.05, (budget, fraction, idx)
