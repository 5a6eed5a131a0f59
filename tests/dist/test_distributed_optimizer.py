"""megatron-core's DDP with its distributed optimizer, and bfloat16 weights with its mixed-precision
optimizer, in the parallel trainers (real gloo processes; tests/mcore_cpu_shim.py gives megatron-core's
hard-coded CUDA spots the CPU): DP=2 with the distributed optimizer reproduces the single-process
(torch AdamW) trace, plain and elastic; its checkpoints (megatron-core dp_reshardable) resume exactly at
the same layout and reshard DP=1 -> DP=2 and DP=2 -> DP=1, continuing the trace; bfloat16 weights
train with fp32 main weights, moments and gradient buffer and stay close to the float32 trace, plain and
elastic (bf16 teacher too)."""

import pytest
import torch
from layouts import SAVE_AT, STEPS, assert_same_trace, resume_copy, spawn_layout, trace, train_one_rank

DOPT = ("parallel.distributed_optimizer=true",)


@pytest.fixture
def root(layout_root):
    return layout_root


def test_distributed_optimizer_dp2_matches_single_process_and_reshards(root):
    assert train_one_rank("plain", root, root / "dopt_dp1", DOPT) == 0
    resume_copy(root / "dopt_dp1", root / "dp1_then_dp2", SAVE_AT)
    spawn_layout(root, tp=1, pp=1, dp=2, runs=[("plain", "dopt_dp2", DOPT), ("plain", "dp1_then_dp2", DOPT),
                                               ("elastic", "elastic_dopt_dp2", DOPT)])  # fmt: skip
    want = trace(root / "single")
    assert len(want) == STEPS
    # Float32 throughout; the distributed optimizer runs the same AdamW element by element on its
    # shard of the fp32 main weights, the gradients are reduce-scattered instead of all-reduced and
    # the grad norm is summed over shards: reductions in another order, the trace tolerance of
    # tests/dist/layouts.py (rtol 1e-4, atol 1e-5; measured differences are ~1e-6).
    assert_same_trace(trace(root / "dopt_dp1"), want)
    assert_same_trace(trace(root / "dopt_dp2"), want)
    diff = max(abs(g["loss"] - w["loss"]) for g, w in zip(trace(root / "dopt_dp2"), want))
    print(f"DP=2 distributed optimizer vs single process: max |loss difference| = {diff:.3g}")
    assert_same_trace(trace(root / "dp1_then_dp2"), want)  # DP=1 checkpoint -> DP=2
    back = resume_copy(root / "dopt_dp2", root / "dp2_then_dp1", SAVE_AT)  # DP=2 checkpoint -> DP=1
    assert train_one_rank("plain", root, back, DOPT) == 0
    assert_same_trace(trace(back), want)
    again = resume_copy(root / "dopt_dp1", root / "dp1_again", SAVE_AT)  # killed after SAVE_AT, resumed
    assert train_one_rank("plain", root, again, DOPT) == 0
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in trace(again)] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in trace(root / "dopt_dp1")]  # fmt: skip
    ref = trace(root / "elastic_single")
    assert any(k.startswith("kd_loss/b0.") for r in ref for k in r)  # masked budgets were trained
    assert_same_trace(trace(root / "elastic_dopt_dp2"), ref)


def test_bfloat16_weights_keep_fp32_main_weights_moments_and_gradients(root):
    import torch.distributed as dist

    import mcore_cpu_shim
    from layouts import config

    from megatron_elastic.parallel.groups import build_groups, destroy_parallel
    from megatron_elastic.parallel.trainer import ParallelTrainer
    from megatron_elastic.training.data_setup import build_training_data

    mcore_cpu_shim.install()
    cfg, _ = config("plain", root, root / "bf16_step", ("train.params_dtype=bfloat16",))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer = ParallelTrainer(cfg, build_training_data(cfg, log=lambda m: None),
                                  groups=build_groups(1, 1, device=torch.device("cpu")))  # fmt: skip
        params = list(trainer.model.parameters())
        assert {p.dtype for p in params} == {torch.bfloat16}
        trainer.set_lr()
        trainer.forward_backward()
        trainer.reduce_gradients()
        assert all(p.grad is None and p.main_grad.dtype == torch.float32 for p in params)  # accumulated in fp32
        assert any(float(p.main_grad.abs().sum()) > 0 for p in params)
        trainer.clip_gradients(params)
        trainer.optimizer_step()
        core = trainer.optimizer.core
        main = [p for group in core.fp32_from_float16_groups for p in group]
        weights = [p for group in core.float16_groups for p in group]
        assert len(main) == len(params) and {p.dtype for p in main} == {torch.float32}
        assert {id(p) for p in weights} == {id(p) for p in params}
        for m, p in zip(main, weights):  # the weights are the rounded fp32 main weights
            torch.testing.assert_close(m.to(torch.bfloat16), p.detach(), rtol=0, atol=0)
        moments = [v for st in core.optimizer.state.values() for k, v in st.items() if k.startswith("exp_avg")]
        assert len(moments) == 2 * len(params) and {v.dtype for v in moments} == {torch.float32}
        # per parameter: fp32 main weight + two fp32 moments; one fp32 step count per tensor
        assert trainer.optimizer.state_bytes() == 12 * sum(p.numel() for p in params) + 4 * len(params)
    finally:
        destroy_parallel()
    assert train_one_rank("plain", root, root / "bf16", ("train.params_dtype=bfloat16",)) == 0
    got, want = trace(root / "bf16"), trace(root / "single")
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per weight and activation);
    # with fp32 main weights the rounding does not accumulate over steps, and the mean loss over
    # 4 x 32 tokens averages it: measured within 1.1e-3 of the float32 loss (~6.2) over 5 steps;
    # asserted with a margin (1e-2, 0.16 % of the loss), far below what a wrong update would cost.
    assert [g["step"] for g in got] == [w["step"] for w in want]
    for g, w in zip(got, want):
        assert g["lr"] == w["lr"]
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-2), (g["step"], g["loss"], w["loss"])
    # the elastic run as the 12B recipe trains: bf16 student and teacher, the distributed optimizer
    # (measured within 2e-3 of the float32 elastic losses; the same margin)
    bf16_elastic = ("train.params_dtype=bfloat16", "parallel.distributed_optimizer=true")
    assert train_one_rank("elastic", root, root / "elastic_bf16", bf16_elastic) == 0
    got, want = trace(root / "elastic_bf16"), trace(root / "elastic_single")
    assert [g["step"] for g in got] == [w["step"] for w in want] and set(got[0]) == set(want[0])
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-2), (g["step"], g["loss"], w["loss"])
