"""The per-GPU memory model (parallel/memory.py) against what real objects hold: saved-for-backward bytes
of whole forwards (saved-tensor hooks) of small models that are not among the fitted shapes, in every
recompute mode; autocast's weight copies; parameter, gradient and AdamW bytes of a real model after a
step; per-rank parameter counts at tp=2 against the shards the TP state-dict split cuts."""

import dataclasses

import pytest
import torch

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import RECOMPUTE_MODES, HybridConfig, num_parameters, preset
from megatron_elastic.model.hybrid import HybridLM
from megatron_elastic.parallel import memory as mem
from megatron_elastic.parallel.tensor import split_tp_state_dict

# Three differently shaped models (none of them a fitted shape): layer orders, GQA ratios, Mamba
# groups, head sizes, scan chunks and (batch, sequence) all differ.
CONFIGS = {
    "M*-M-": (dict(pattern="M*-M-", vocab_size=61, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                   num_query_groups=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2,
                   mamba_state_dim=8, mamba_chunk_size=16), 2, 48),
    "-M*M": (dict(pattern="-M*M", vocab_size=96, hidden_size=56, ffn_hidden_size=112, num_attention_heads=8,
                  num_query_groups=4, head_dim=12, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=4,
                  mamba_state_dim=16, mamba_chunk_size=32), 1, 96),
    "MM*--": (dict(pattern="MM*--", vocab_size=80, hidden_size=24, ffn_hidden_size=72, num_attention_heads=3,
                   num_query_groups=1, head_dim=16, mamba_num_heads=6, mamba_head_dim=10, mamba_num_groups=3,
                   mamba_state_dim=4, mamba_chunk_size=8), 3, 40),
}  # fmt: skip


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: HybridLM(HybridConfig(**raw)) for name, (raw, _, _) in CONFIGS.items()}


@pytest.mark.parametrize("masked", [True, False], ids=["elastic", "plain"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_bytes_match_the_measured_forward(models, name, masked):
    """fp32 parameters under bf16 autocast (the trainer's CUDA default), masks that carry gradients or none."""
    model, (_, b, L) = models[name], CONFIGS[name]
    for mode in RECOMPUTE_MODES:
        measured, copies = mem.measure_model(model, mode, b, L, masked=masked)
        predicted = mem.predict_model(model.config, mode, b, L, masked=masked)
        assert abs(predicted / measured - 1) < 0.10, (name, mode, measured, predicted)
        # autocast's bf16 weight copies: the linears' weights, only the output layer's under full recomputation
        names = mem.cached_weight_names(model.config, mode)
        assert copies == sum(2 * p.numel() for n, p in model.named_parameters() if n in names), (mode, copies)


def test_bf16_parameters_saved_bytes(models):
    model = HybridLM(models["-M*M"].config).to(torch.bfloat16)
    _, b, L = CONFIGS["-M*M"]
    for mode in RECOMPUTE_MODES:
        measured, _ = mem.measure_model(model, mode, b, L, masked=True, params_dtype="bfloat16")
        predicted = mem.predict_model(model.config, mode, b, L, masked=True, params_dtype="bfloat16")
        assert abs(predicted / measured - 1) < 0.10, (mode, measured, predicted)


def test_the_fit_reproduces_its_measurements():
    acts = mem.fit_activation_model()
    for (kind, mode), fit in acts.fits.items():
        assert fit.max_rel_residual < 0.06, (kind, mode, fit.max_rel_residual)
    # the recompute modes keep less and less
    w = mem.layer_widths(preset("nemotron-nano-12b-v2"), 0, tp=8)
    none, selective, full = (acts.layer_bytes("M", m, w, 1, 8192) for m in RECOMPUTE_MODES)
    assert full < selective < none


def test_loss_buffers_match_the_measured_losses():
    coef, resid = mem.fit_loss_model(vocab_parallel=False)
    assert resid < 0.01
    from megatron_elastic.distill.losses import cross_entropy, forward_kl

    b, L, V = 3, 20, 72  # not a fitted shape
    measured = mem.measure_loss(forward_kl, cross_entropy, b, L, V)
    predicted = coef[0] * b * L * V + coef[1] * b * L
    assert abs(predicted / measured - 1) < 0.10, (measured, predicted)


def test_parameter_gradient_and_optimizer_bytes_of_a_real_step(models):
    model = models["M*-M-"]
    _, b, L = CONFIGS["M*-M-"]
    layout = mem.MemoryLayout(seq_len=L, micro_batch_size=b, params_dtype="float32", teacher_dtype="float32")
    est = mem.estimate_memory(model.config, layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, model.config.vocab_size, (b, L))
    model(tokens).logsumexp(-1).mean().backward()
    opt.step()
    params = list(model.parameters())
    assert est.parameters == sum(p.numel() for p in params)
    assert est.item("student weights") == sum(p.nbytes for p in params)
    assert est.item("frozen teacher") == sum(p.nbytes for p in params)  # a same-dtype copy
    assert est.item("gradients") == sum(p.grad.nbytes for p in params)
    moments = sum(opt.state[p][k].nbytes for p in params for k in ("exp_avg", "exp_avg_sq"))
    assert est.item("optimizer") == moments
    cached = mem.cached_weight_names(model.config, layout.recompute)
    assert est.item("autocast weight cache") == sum(2 * p.numel() for n, p in model.named_parameters() if n in cached)
    model.zero_grad(set_to_none=True)
    # bf16 parameters: half the weight bytes, fp32 gradients, fp32 main weights + moments (12 B), sharded over dp
    bf16 = dataclasses.replace(layout, params_dtype="bfloat16", compute_dtype="bfloat16", dp=4,
                               distributed_optimizer=True)  # fmt: skip
    est16 = mem.estimate_memory(model.config, bf16)
    assert est16.item("student weights") == sum(p.to(torch.bfloat16).nbytes for p in params)
    assert est16.item("optimizer") == pytest.approx(est.parameters * 12 / 4)
    assert est16.item("DP all-reduce buffer") == 0
    assert mem.estimate_memory(model.config, dataclasses.replace(bf16, distributed_optimizer=False)).item(
        "DP all-reduce buffer") == est.parameters * 4  # fmt: skip


@pytest.mark.parametrize("tie", [False, True])
def test_tp2_counts_equal_the_tensor_parallel_shards(models, tie):
    config = dataclasses.replace(models["-M*M"].config, tie_embeddings=tie)
    full = HybridLM(config).state_dict()
    counts = [mem.rank_parameter_counts(config, tp=2) for _ in range(2)]
    for rank in range(2):
        shard = split_tp_state_dict(full, config, rank, 2)
        assert counts[rank] == {n: t.numel() for n, t in shard.items()}, rank
    # pipeline stages hold every parameter exactly once
    stages = [mem.rank_parameter_counts(config, tp=1, pp=2, pp_rank=r) for r in range(2)] if not tie else []
    if stages:
        assert not set(stages[0]) & set(stages[1])
        assert sum(sum(s.values()) for s in stages) == sum(num_parameters(config).values())


def test_the_12b_parameters_per_rank():
    config = preset("nemotron-nano-12b-v2")
    assert sum(mem.rank_parameter_counts(config, tp=1).values()) == 12_310_001_152
    per_rank = sum(mem.rank_parameter_counts(config, tp=8).values())
    assert per_rank == 1_539_032_384
    replicated = config.hidden_size * (config.num_layers + 1)  # the block pre-norms and the final norm
    assert per_rank == (12_310_001_152 - replicated) // 8 + replicated


def test_sequence_parallelism_divides_the_block_part():
    config = preset("nemotron-nano-12b-v2")
    base = mem.MemoryLayout(tp=8, pp=2, dp=8, seq_len=8192, recompute="full")  # stage 0: no loss to fit
    on = mem.estimate_stage(config, dataclasses.replace(base, sequence_parallel=True), 0).item("activations")
    off = mem.estimate_stage(config, base, 0).item("activations")
    assert on < off / 4  # full recomputation keeps block inputs: split by position


@pytest.mark.parametrize("bad, needle", [
    (dict(tp=1, sequence_parallel=True), "sequence_parallel=true needs tp > 1"),
    (dict(tp=3), "not divisible by parallel.tp=3"),
    (dict(recompute="some"), "recompute='some' is invalid"),
    (dict(tp=8, sequence_parallel=True, seq_len=8190), "seq_len=8190 is not a multiple of tp=8"),
    (dict(params_dtype="fp16"), "params_dtype='fp16' is invalid"),
])  # fmt: skip
def test_bad_layouts_are_one_line_errors(bad, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        mem.estimate_memory(preset("nemotron-nano-12b-v2"), mem.MemoryLayout(**bad))
    assert "\n" not in str(err.value)


def test_layout_from_a_run_config(models):
    from megatron_elastic.config.schema import (
        DataConfig, DistillConfig, ElasticConfig, ParallelConfig, RunConfig, TrainConfig,
    )  # fmt: skip

    train = TrainConfig(micro_batch_size=2, global_batch_size=16, recompute="selective", precision="bf16")
    cfg = RunConfig(model=models["-M*M"].config, data=DataConfig(seq_len=64, tokenizer_vocab_size=96), train=train,
                    parallel=ParallelConfig(tp=2, sequence_parallel=True),
                    elastic=ElasticConfig(parent="parent", budgets=[1.0, 0.75, 0.5]),
                    distill=DistillConfig())  # fmt: skip
    cfg.validate()
    layout = mem.MemoryLayout.from_run_config(cfg, dp=2, params_dtype="bfloat16", distributed_optimizer=True)
    assert (layout.tp, layout.pp, layout.dp, layout.sequence_parallel) == (2, 1, 2, True)
    assert (layout.micro_batch_size, layout.seq_len, layout.grad_accum, layout.recompute) == (2, 64, 4, "selective")
    assert (layout.params_dtype, layout.teacher_dtype, layout.budgets_per_micro_batch) == ("bfloat16", "bfloat16", 3)
    with pytest.raises(ConfigError, match="global_batch_size=16 is not a multiple of micro_batch_size x dp = 6"):
        mem.MemoryLayout.from_run_config(cfg, dp=3)
    plain = mem.MemoryLayout.from_run_config(dataclasses.replace(cfg, elastic=None, distill=None), dp=2)
    assert plain.teacher_dtype is None and not plain.elastic
