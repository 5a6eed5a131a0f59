"""Tensor parallelism with two real gloo processes: the TP=2 model equals the single-device model.

One spawn runs every scenario (megatron-core takes seconds to import in each process); rank 0
writes gathered logits, merged gradients and losses, and the tests compare them here with the
single-device model: plain, with random heterogeneous hard masks on every axis (hidden, FFN,
attention heads within KV groups, Mamba heads within groups, Mamba head channels, depth), and with
soft masks whose own gradients (what the router learns from) must match too; each of them again
with sequence parallelism.
"""

import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import random_arch
from reference import randomize_
from spawning import spawn_ranks

from megatron_elastic.distill.losses import forward_kl
from megatron_elastic.elastic import hard_state
from megatron_elastic.model import HybridConfig, HybridLM
from megatron_elastic.model.elastic_state import ElasticState, LayerMask

TP = 2
# Every axis non-trivial and TP-divisible: 2 Mamba groups x 4 heads, 2 KV groups x 3 query heads,
# biases everywhere, head_dim != hidden / heads; vocabulary even.
CFG = dict(
    pattern="M*-M-*M", vocab_size=102, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6,
    num_query_groups=2, head_dim=10, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=2,
    mamba_state_dim=4, mamba_chunk_size=8, mlp_bias=True, mamba_proj_bias=True,
)  # fmt: skip
# fp32 throughout; TP changes only the order of reductions (all-reduce of partial matmuls and
# softmax sums), so results agree to rounding: the "state tolerance" used across the parallel tests.
RTOL, ATOL = 1e-4, 1e-5
TIED = CFG | dict(tie_embeddings=True)
SEEDS = (0, 1)


def spawn(worker, *args, world: int = TP, timeout: float = 300) -> None:
    """Run ``worker(rank, port, *args)`` in ``world`` (default: TP) fresh processes; assert every exit code is 0."""
    spawn_ranks(worker, *args, world=world, timeout=timeout)


def init_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP)


def build(cfg: dict = CFG, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return randomize_(HybridLM(HybridConfig(**cfg)), seed=seed)


def batch(cfg: dict = CFG, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(seed))


def soft_state(config: HybridConfig, seed: int) -> ElasticState:
    """Random mask values in (0, 1) on every axis, as leaf tensors that collect gradients."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(n):
        return (0.2 + 0.8 * torch.rand(n, generator=gen)).requires_grad_()

    layers = []
    for i, kind in enumerate(config.layer_types):
        d = config.layer_dims(i)
        if kind == "-":
            layers.append(LayerMask(ffn=leaf(d.ffn_hidden_size), keep=leaf(()) if i % 2 else 1.0))
        elif kind == "*":
            layers.append(LayerMask(attn_heads=leaf(d.num_attention_heads)))
        else:
            layers.append(LayerMask(mamba_heads=leaf(d.mamba_num_heads), mamba_head_dim=leaf(d.mamba_head_dim)))
    return ElasticState(hidden=leaf(config.hidden_size), layers=layers)


def state_leaves(state: ElasticState) -> dict[str, torch.Tensor]:
    out = {"hidden": state.hidden}
    for i, m in enumerate(state.layers):
        for name in ("ffn", "attn_heads", "mamba_heads", "mamba_head_dim", "keep"):
            v = getattr(m, name)
            if torch.is_tensor(v):
                out[f"{i}.{name}"] = v
    return out


def scenarios(config: HybridConfig):
    """name -> (state factory); every rank builds the same global state."""
    out = {"plain": lambda: None}
    for seed in SEEDS:
        out[f"hard{seed}"] = lambda seed=seed: hard_state(
            config, random_arch(config, random.Random(seed), ffn_multiple=TP, always_keep_first=True))
    out["soft"] = lambda: soft_state(config, 5)
    return out


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """The gradient, zeros where backward never reached (a dropped layer)."""
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


def _gather_last(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(TP)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-1)


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_worker(rank, port)
    try:
        from megatron_elastic.model.hybrid import set_recompute
        from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy
        from megatron_elastic.parallel.tensor import (
            allreduce_sequence_parallel_grads,
            apply_tensor_parallel,
            merge_tp_state_dicts,
            split_tp_state_dict,
            tp_component_slices,
        )  # fmt: skip

        group = dist.group.WORLD
        dense = build()
        full_sd = {k: v.clone() for k, v in dense.state_dict().items()}
        dense_components = tp_component_slices(dense)
        model = apply_tensor_parallel(build(), group)
        sp_model = apply_tensor_parallel(build(), group, sequence_parallel=True)
        config = model.config
        results = {}
        tokens = batch()
        runs = [(name, model, make) for name, make in scenarios(config).items()]
        runs += [(f"sp_{name}", sp_model, make) for name, make in scenarios(config).items()]
        for prefix, m in (("", model), ("sp_", sp_model)):
            runs += [(f"{prefix}{mode}_{name}", m, scenarios(config)[name]) for mode, name in RECOMPUTED]
        for name, model, make_state in runs:
            mode = next((m for m in ("full", "selective") if f"{m}_" in name), "none")
            set_recompute(model, mode)  # the parallel blocks and mixers recompute in backward
            model.zero_grad(set_to_none=True)
            state = make_state()
            logits = model(tokens[:, :-1], elastic=state)
            assert logits.shape == (2, 20, config.vocab_size // TP)
            loss = vocab_parallel_cross_entropy(logits, tokens[:, 1:], group)
            loss.backward()
            allreduce_sequence_parallel_grads(model)  # block norms and row biases under sequence parallelism
            grads = {n: grad_of(p) for n, p in model.named_parameters()}
            shards = [None] * TP
            dist.all_gather_object(shards, grads)
            entry = {"logits": _gather_last(logits.detach()), "loss": loss.detach(), "grads": merge_tp_state_dicts(shards, config)}
            if name.endswith("soft"):
                entry["mask_grads"] = {k: v.grad.clone() for k, v in state_leaves(state).items()}
                mask_grads = [None] * TP
                dist.all_gather_object(mask_grads, entry["mask_grads"])
                for k in entry["mask_grads"]:  # every rank holds the whole global mask's gradient
                    torch.testing.assert_close(mask_grads[0][k], mask_grads[1][k], rtol=0, atol=0)
            results[name] = entry
            set_recompute(model, "none")
        # tied embeddings: the head multiplies by the (vocabulary-sharded) embedding weight
        tied = apply_tensor_parallel(build(TIED), group)
        logits = tied(tokens[:, :-1], elastic=scenarios(config)["hard0"]())
        loss = vocab_parallel_cross_entropy(logits, tokens[:, 1:], group)
        loss.backward()
        shards = [None] * TP
        dist.all_gather_object(shards, {n: grad_of(p) for n, p in tied.named_parameters()})
        results["tied"] = {"logits": _gather_last(logits.detach()), "loss": loss.detach(),
                           "grads": merge_tp_state_dicts(shards, tied.config)}  # fmt: skip
        # the layout contract: local[c.local_slice] is chunk `rank` of the global component c.key
        local = dict(model.named_parameters())
        global_pieces = {c.key: full_sd[n][c.local_slice] for n, cs in dense_components.items() for c in cs}
        layout = tp_component_slices(model)
        assert set(layout) == set(dense_components), "TP and plain models have different parameters"
        for n, comps in layout.items():
            assert [c.key for c in comps] == [c.key for c in dense_components[n]], n
            for c in comps:
                whole = global_pieces[c.key]
                expected = whole if c.shard_axis is None else whole.chunk(TP, dim=c.shard_axis)[rank]
                torch.testing.assert_close(local[n].detach()[c.local_slice], expected, rtol=0, atol=0, msg=n)
        # the split of the single-device state dict is exactly this rank's state dict
        mine = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
        split = split_tp_state_dict(full_sd, config, rank, TP)
        assert set(split) == set(mine)
        for k in mine:
            torch.testing.assert_close(split[k], mine[k], rtol=0, atol=0, msg=k)
        results["layout_checked"] = True
        results["losses"] = _loss_checks(rank)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    spawn(_worker, str(out))
    return torch.load(out / "results.pt")


def _dense_run(state, cfg=CFG):
    model = build(cfg)
    tokens = batch()
    logits = model(tokens[:, :-1], elastic=state)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return model, logits.detach(), loss.detach()


NAMES = ["plain", *(f"hard{s}" for s in SEEDS), "soft"]
# Activation recomputation under TP and sequence parallelism, with hard and soft (gradient-carrying) masks.
RECOMPUTED = [("full", "soft"), ("selective", "soft"), ("full", "hard0")]
RECOMPUTED_NAMES = [f"{p}{mode}_{n}" for p in ("", "sp_") for mode, n in RECOMPUTED]


@pytest.mark.parametrize("name", NAMES + ["tied"] + [f"sp_{n}" for n in NAMES] + RECOMPUTED_NAMES)
def test_tp2_logits_and_grads_equal_single_device(tp_results, name):
    """``sp_*``: the same with sequence parallelism (each rank keeps half the positions between mixers);
    ``full_*`` / ``selective_*``: with activation recomputation (against the single device without it)."""
    config = HybridConfig(**CFG)
    base = name.removeprefix("sp_").removeprefix("full_").removeprefix("selective_")
    state = scenarios(config)["hard0" if name == "tied" else base]()
    model, logits, loss = _dense_run(state, TIED if name == "tied" else CFG)
    got = tp_results[name]
    assert logits.abs().max() > 1.0  # a non-trivial model: the comparison can fail
    torch.testing.assert_close(got["logits"], logits, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got["loss"], loss, rtol=RTOL, atol=ATOL)
    grads = dict(model.named_parameters())
    assert set(got["grads"]) == set(grads)
    for n, p in grads.items():
        torch.testing.assert_close(got["grads"][n], grad_of(p), rtol=RTOL, atol=ATOL, msg=n)
    if name.endswith("soft"):
        for k, v in state_leaves(state).items():
            torch.testing.assert_close(got["mask_grads"][k], v.grad, rtol=RTOL, atol=ATOL, msg=k)


def test_tp2_layout_contract_and_split_checked(tp_results):
    assert tp_results["layout_checked"] is True  # the worker asserted them (it exits non-zero otherwise)


# ----------------------------------------------------------------------------- losses


def _loss_checks(rank: int) -> dict:
    """Vocab-parallel CE and KL on random sharded logits (run inside the TP workers)."""
    from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy, vocab_parallel_kl

    group = dist.group.WORLD
    student, teacher, labels = _loss_inputs()
    out = {}
    for t in (1.0, 2.5):
        s = student.chunk(TP, dim=-1)[rank].clone().requires_grad_()
        te = teacher.chunk(TP, dim=-1)[rank].clone().requires_grad_()
        kl = vocab_parallel_kl(s, te, group, temperature=t)
        kl.backward()
        out[f"kl{t}"] = (kl.detach(), _gather_last(s.grad), _gather_last(te.grad))
    s = student.chunk(TP, dim=-1)[rank].clone().requires_grad_()
    before = s.detach().clone()
    ce = vocab_parallel_cross_entropy(s, labels, group)
    ce.backward()
    assert torch.equal(s.detach(), before), "the loss must not modify the caller's logits"
    out["ce"] = (ce.detach(), _gather_last(s.grad))
    return out


def _loss_inputs():
    gen = torch.Generator().manual_seed(11)
    student = 3 * torch.randn(3, 7, 64, generator=gen)
    teacher = 3 * torch.randn(3, 7, 64, generator=gen)
    labels = torch.randint(0, 64, (3, 7), generator=gen)
    labels[0, :2] = -100  # ignored positions, as F.cross_entropy ignores them
    return student, teacher, labels


@pytest.fixture(scope="module")
def loss_results(tp_results):
    return tp_results["losses"]


def test_vocab_parallel_cross_entropy_equals_dense(loss_results):
    student, _, labels = _loss_inputs()
    s = student.clone().requires_grad_()
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten())
    ce.backward()
    value, grad = loss_results["ce"]
    torch.testing.assert_close(value, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, s.grad, rtol=1e-5, atol=1e-7)
    assert grad[0, :2].abs().max() == 0


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_vocab_parallel_kl_equals_dense(loss_results, t):
    student, teacher, _ = _loss_inputs()
    s, te = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    kl = forward_kl(s, te, temperature=t)
    kl.backward()
    value, gs, gt = loss_results[f"kl{t}"]
    assert kl > 0.1
    torch.testing.assert_close(value, kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, s.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gt, te.grad, rtol=1e-5, atol=1e-7)
