"""Mixture-of-experts ('E') layers: routing and expert computation against plain per-token references,
parameter counts (total and active), the balancing rules (bias update, load-balancing loss gradient),
config errors, and the features that refuse MoE in one line. Parity with transformers is in
tests/integration/test_hf_parity.py."""

import re

import pytest
import torch

from megatron_elastic.elastic.search_space import ElasticSpace
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, num_parameters
from megatron_elastic.model.config import moe_parameters
from megatron_elastic.model.hybrid import set_recompute
from megatron_elastic.model.moe import MoE, TopkRouter, set_moe_balancing, update_expert_bias
from megatron_elastic.parallel.tensor import check_fp8_divisibility, check_tp_divisibility


def moe_config(**kw) -> HybridConfig:
    spec = dict(pattern="ME*E-", vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                num_query_groups=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2,
                mamba_state_dim=8, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
                moe_shared_expert_intermediate_size=40, moe_router_num_groups=4, moe_router_group_topk=2,
                moe_router_topk_scaling_factor=1.5, moe_latent_size=16)  # fmt: skip
    spec.update(kw)
    return HybridConfig(**spec)


def reference_route(router: TopkRouter, x: torch.Tensor):
    """Token by token, in float64, straight from the definition."""
    W, bias = router.weight.double(), router.e_score_correction_bias.double()
    E, G = router.num_experts, router.num_groups
    weights, picks = [], []
    for t in x.double():
        s = torch.sigmoid(W @ t)
        c = s + bias
        per = E // G
        group_score = [sorted(c[g * per:(g + 1) * per].tolist())[-2:] for g in range(G)]
        groups = sorted(range(G), key=lambda g: -sum(group_score[g]))[: router.group_topk]
        allowed = [e for e in range(E) if e // per in groups]
        chosen = sorted(allowed, key=lambda e: -c[e].item())[: router.top_k]
        w = s[chosen]
        if router.norm_topk_prob:
            w = w / w.sum()
        weights.append(dict(zip(chosen, (w * router.scaling).tolist())))
        picks.append(set(chosen))
    return picks, weights


@pytest.mark.parametrize("groups,group_topk,norm", [(4, 2, True), (1, 1, False), (2, 1, True)])
def test_routing_matches_the_definition(groups, group_topk, norm):
    cfg = moe_config(moe_router_num_groups=groups, moe_router_group_topk=group_topk, moe_norm_topk_prob=norm)
    torch.manual_seed(0)
    router = HybridLM(cfg).layers[1].mixer.gate.eval()
    router.e_score_correction_bias.copy_(0.3 * torch.randn(8))  # large enough to change some choices
    x = torch.randn(40, 32)
    _, weights, indices = router(x)
    picks, ref = reference_route(router, x)
    for t in range(len(x)):
        assert set(indices[t].tolist()) == picks[t], t
        got = dict(zip(indices[t].tolist(), weights[t].tolist()))
        assert got == pytest.approx(ref[t], rel=1e-5, abs=1e-6)
    unbiased = {tuple(sorted(p)) for p in reference_route(_without_bias(router), x)[0]}
    assert {tuple(sorted(p)) for p in picks} != unbiased  # the bias moved some choices


def _without_bias(router):
    import copy

    r = copy.deepcopy(router)
    r.e_score_correction_bias.zero_()
    return r


def test_grouped_experts_equal_a_per_token_loop():
    cfg = moe_config()
    torch.manual_seed(1)
    moe = HybridLM(cfg).layers[1].mixer
    x = torch.randn(3, 7, 32)
    got = moe(x)
    _, w, idx = moe.gate(x.reshape(-1, 32))
    ref = []
    for t, token in enumerate(x.reshape(-1, 32)):
        h = moe.fc1_latent_proj(token)
        y = sum(w[t, k] * (moe.experts.down_proj[e] @ torch.relu(moe.experts.up_proj[e] @ h).square())
                for k, e in enumerate(idx[t].tolist()))  # fmt: skip
        ref.append(moe.fc2_latent_proj(y) + moe.shared_experts(token))
    torch.testing.assert_close(got, torch.stack(ref).view(3, 7, 32), rtol=1e-5, atol=1e-6)
    empty = moe_config(num_moe_experts=16, moe_router_num_groups=8, moe_router_group_topk=1, moe_router_topk=1)
    m = HybridLM(empty).layers[1].mixer
    one = torch.randn(1, 1, 32)
    assert torch.isfinite(m(one)).all() and m.gate(one.view(1, 32))[2].numel() == 1  # 15 of 16 experts idle


def test_parameter_counts_total_and_active():
    cfg = moe_config()
    model = HybridLM(cfg)
    assert sum(num_parameters(cfg).values()) == model.num_parameters()
    moe = model.layers[1].mixer
    counts = moe_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in moe.parameters())
    assert counts["expert"] == 2 * 16 * 24 and counts["experts"] == 8 * counts["expert"]
    assert counts["active"] == counts["total"] - (8 - 2) * counts["expert"]
    assert "num_moe_experts" in cfg.to_dict() and HybridConfig.from_dict(cfg.to_dict()) == cfg
    dense = moe_config(pattern="M*-")
    assert "num_moe_experts" not in dense.to_dict()  # dense configs keep the keys they always had


def test_bias_update_moves_load_towards_balance_and_ignores_recompute():
    cfg = moe_config(pattern="*E-E")
    biases = []
    for mode in ("none", "full"):
        torch.manual_seed(2)
        model = HybridLM(cfg).train()
        set_recompute(model, mode)
        tokens = torch.randint(0, 64, (4, 16))
        model(tokens).sum().backward()
        router = model.layers[1].mixer.gate
        load = router.tokens_per_expert.clone()
        assert load.max() > load.min()  # unbalanced: the update has a direction for every expert
        assert load.sum() == (2 if mode == "full" else 1) * 4 * 16 * 2  # full recompute routes twice
        update_expert_bias(model, 1e-3)
        b = router.e_score_correction_bias
        torch.testing.assert_close(b, 1e-3 * torch.sign(load.mean() - load), rtol=0, atol=0)
        assert router.tokens_per_expert.sum() == 0  # counts restart after each update
        biases.append(torch.cat([m.gate.e_score_correction_bias for m in model.modules() if isinstance(m, MoE)]))
    torch.testing.assert_close(biases[0], biases[1], rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert router.tokens_per_expert.sum() == 0  # evaluation is not counted


def test_load_balancing_loss_reaches_the_router_gradient():
    cfg = moe_config()
    torch.manual_seed(3)
    router = HybridLM(cfg).layers[1].mixer.gate.train()
    x = torch.randn(50, 32)
    g = torch.randn(50, 2)
    coeff = 0.7
    set_moe_balancing(router, coeff, micro_batches=2)  # the per-micro-batch weight is coeff / 2
    _, w, _ = router(x)
    (w * g).sum().backward()
    got = router.weight.grad.clone()
    router.weight.grad = None
    set_moe_balancing(router, 0.0)
    scores, w, idx = router(x)
    counts = torch.bincount(idx.reshape(-1), minlength=8).float()
    f = counts / counts.sum()
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    ((w * g).sum() + coeff / 2 * 8 * (f * p).sum()).backward()
    torch.testing.assert_close(got, router.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw,needle", [
    (dict(num_moe_experts=0), "model.num_moe_experts=0 is invalid; the pattern has MoE ('E') layers"),
    (dict(moe_router_num_groups=3), "model.moe_router_num_groups=3 does not split 8 routed experts"),
    (dict(moe_router_group_topk=5), "model.moe_router_group_topk=5 exceeds model.moe_router_num_groups=4"),
    (dict(moe_router_topk=5, moe_router_group_topk=2), "model.moe_router_topk=5 exceeds the 4 experts"),
    (dict(moe_latent_size=-1), "model.moe_latent_size=-1 is invalid"),
    (dict(moe_router_topk_scaling_factor=float("nan")), "model.moe_router_topk_scaling_factor=nan is invalid"),
    (dict(pattern="MX"), "layer pattern 'MX' has unknown symbol 'X' at position 1; use only M (Mamba-2), * (attention), - (MLP), E"),
])  # fmt: skip
def test_moe_config_errors_name_the_fix(kw, needle):
    with pytest.raises(ConfigError, match="^" + re.escape(needle)):
        moe_config(**kw)


def test_features_without_moe_support_refuse_in_one_line():
    cfg = moe_config()
    with pytest.raises(ConfigError, match=r"^elastic.moe_ffn=\[1.0, 0.5\] shrinks mixture-of-experts layers but the "
                       r"parent has no 'E' layers; set elastic.moe_ffn to \[1.0\]$"):
        ElasticSpace(HybridConfig(**(moe_config().to_dict() | {"pattern": "M*-"})), moe_ffn=[1.0, 0.5])
    with pytest.raises(ConfigError, match=r"^parallel.tp=2 with mixture-of-experts \('E'\) layers is not supported"):
        check_tp_divisibility(cfg, 2)
    with pytest.raises(ConfigError, match=r"^parallel.fp8 with mixture-of-experts"):
        check_fp8_divisibility(cfg, 1)
    check_tp_divisibility(cfg, 1)  # a single rank (data / pipeline parallel) is fine


def test_routing_biases_survive_save_and_load(tmp_path):
    """The correction bias is model state (checkpoints and exports carry it); the load counts are not."""
    from megatron_elastic.api import load_pretrained
    from megatron_elastic.convert.native import save_native

    model = HybridLM(moe_config(pattern="E-E"))
    for m in model.modules():
        if isinstance(m, TopkRouter):
            m.e_score_correction_bias.copy_(torch.randn(8))
    state = model.state_dict()
    assert "layers.0.mixer.gate.e_score_correction_bias" in state and not any("tokens_per_expert" in k for k in state)
    save_native(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    for key in ("layers.0.mixer.gate.e_score_correction_bias", "layers.2.mixer.gate.e_score_correction_bias"):
        torch.testing.assert_close(loaded.state_dict()[key], state[key], rtol=0, atol=0)


def test_a_training_step_balances_the_routers(tmp_path):
    """Trainer wiring: the load-balancing loss is weighted per micro-batch and every router takes one
    bias step of exactly the rate per optimizer step, its counts restarting."""
    from helpers import BatchData, BatchLoader

    from megatron_elastic.config import load_config
    from megatron_elastic.tracking import MultiTracker
    from megatron_elastic.training.trainer import Trainer

    model = moe_config(pattern="E*E").to_dict()
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "train.device=cpu", "train.micro_batch_size=2",
                               "train.global_batch_size=4", "train.moe_aux_loss_coeff=0.01",
                               "train.moe_bias_update_rate=0.002"])  # fmt: skip
    cfg.model = HybridConfig.from_dict(model)
    g = torch.Generator().manual_seed(5)
    tokens = [torch.randint(0, 64, (2, 17), generator=g) for _ in range(2)]
    trainer = Trainer(cfg, BatchData(BatchLoader([(t[:, :-1], t[:, 1:]) for t in tokens])), tracker=MultiTracker([]))
    routers = [m for m in trainer.model.modules() if isinstance(m, TopkRouter)]
    assert [r.aux_loss_coeff for r in routers] == [0.005, 0.005]  # 0.01 over 2 micro-batches
    loss, grad_norm, _ = trainer.train_step()
    assert torch.isfinite(torch.tensor([loss, grad_norm])).all() and trainer.step == 1
    for r in routers:
        step = r.e_score_correction_bias.abs()
        assert step.max() > 0 and torch.all((step == 0) | (step == torch.tensor(0.002)))  # one step of the rate
        assert r.tokens_per_expert.sum() == 0


def test_nemotron_3_nano_preset_has_the_published_size_and_round_trips_through_nemotron_h():
    from megatron_elastic.convert.hf import config_from_hf, config_to_hf
    from megatron_elastic.model import preset
    from megatron_elastic.model.config import active_parameters
    from megatron_elastic.model.summary import parameter_table

    cfg = preset("nemotron-3-nano-30b-a3b")
    total = sum(num_parameters(cfg).values())
    assert round(total / 1e8) == 316  # "31.6B total parameters"
    assert (cfg.layer_types.count("M"), cfg.layer_types.count("E"), cfg.layer_types.count("*")) == (23, 23, 6)
    moe = moe_parameters(cfg)
    active = total - 23 * (moe["experts"] - 6 * moe["expert"])
    assert moe["active"] == moe["total"] - 122 * moe["expert"]
    assert active_parameters(cfg) == active == 3_580_073_408
    # published (to 0.1B): "3.2B active parameters (3.6B including embeddings)"
    assert round(active / 1e8) == 36 and round((active - num_parameters(cfg)["embedding"]) / 1e8) == 32
    table = parameter_table(cfg)
    assert "active per token               3,580,073,408   (3.58B)" in table
    assert "without embedding            3,227,751,872   (3.23B)" in table
    assert "active" not in parameter_table(preset("tiny"))
    hf = config_to_hf(cfg)
    assert (hf["n_routed_experts"], hf["num_experts_per_tok"], hf["moe_latent_size"]) == (128, 6, None)
    assert hf["layers_block_type"].count("moe") == 23
    assert config_from_hf(hf) == cfg


def test_tiny_moe_preset_mixes_dense_and_moe_layers():
    from megatron_elastic.model import preset

    cfg = preset("tiny-moe")
    assert cfg.layer_types == ["M", "-", "M", "E", "*", "M", "E"]
    model = HybridLM(cfg)
    assert sum(num_parameters(cfg).values()) == model.num_parameters() == 1_282_504
    moe = moe_parameters(cfg)  # 8 experts of 2 x 128 x 128, a 192-wide shared expert, a 128 x 8 router
    assert (moe["expert"], moe["shared"], moe["router"]) == (32_768, 49_152, 1_024)
    assert moe["active"] == moe["router"] + moe["shared"] + 2 * moe["expert"] == 115_712
