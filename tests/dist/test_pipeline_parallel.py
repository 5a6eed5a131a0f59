"""Pipeline parallelism with two real gloo processes and megatron-core's 1F1B schedule.

One spawn runs every scenario (megatron-core takes seconds to import per process):

* plain PP=2 training reproduces the single-process trainer's loss trace (5 steps, 2 micro-batches
  per step, so the schedule really interleaves);
* a single-process checkpoint resumes at PP=2 and a PP=2 checkpoint resumes in one process, both
  continuing the single-process trace (the AdamW moments reshard with the weights);
* elastic nested distillation at PP=2 (teacher split like the student, budgets sampled, depth
  skipped inside stages, router gradients summed over stages) reproduces the single-process
  elastic trainer; its many-in-one parent, streamed from the stages, equals the single-process export
  of its last checkpoint byte for byte;
* activation recomputation (``train.recompute=full`` / ``selective``) at PP=2 gives the very same
  losses, gradient norms and final weights as none;
* one micro-batch's teacher logits are alive at a time on the last stage, with 2 micro-batches per
  step as with 4.

The CPU processes need ``tests/mcore_cpu_shim.py`` for megatron-core's hard-coded CUDA buffers.
"""

import itertools

import pytest
from layouts import (
    SAVE_AT,
    STEPS,
    assert_same_trace,
    assert_streamed_export,
    make_parent,
    probes,
    resume_copy,
    spawn_layout,
    trace,
    train,
)

from megatron_elastic.parallel.pipeline import balanced_counts, layer_costs, stage_layer_ranges

# The stages run the very same ops; only the grad norm's partial sums per stage differ in order.
RTOL, ATOL = 1e-5, 1e-6


def test_pipeline_parallel_reproduces_single_process(tmp_path):
    make_parent(tmp_path)
    assert train("plain", tmp_path, tmp_path / "single") == 0  # also fills the data cache for the workers
    assert train("elastic", tmp_path, tmp_path / "elastic_single") == 0
    resume_copy(tmp_path / "single", tmp_path / "single_then_pp2", SAVE_AT)
    spawn_layout(tmp_path, tp=1, pp=2, runs=[
        ("plain", "pp2"), ("plain", "single_then_pp2"), ("elastic", "elastic_pp2"),
        ("elastic", "elastic_pp2_full", ["train.recompute=full"]),
        ("elastic", "elastic_pp2_selective", ["train.recompute=selective"]),
        ("elastic", "elastic_pp2_ga4", ["train.global_batch_size=8"]),
    ])  # fmt: skip

    want = trace(tmp_path / "single")
    assert len(want) == STEPS
    assert_same_trace(trace(tmp_path / "pp2"), want, RTOL, ATOL)
    assert_same_trace(trace(tmp_path / "single_then_pp2"), want, RTOL, ATOL)  # one process -> PP=2
    back = resume_copy(tmp_path / "pp2", tmp_path / "pp2_then_single", SAVE_AT)  # PP=2 -> one process
    assert train("plain", tmp_path, back) == 0
    assert_same_trace(trace(back), want, RTOL, ATOL)

    ref = trace(tmp_path / "elastic_single")
    assert any(k.startswith("kd_loss/b0.") for r in ref for k in r)  # masked budgets were trained
    assert_same_trace(trace(tmp_path / "elastic_pp2"), ref)  # layouts.RTOL: router metrics (see there)
    assert_streamed_export(tmp_path / "elastic_pp2")

    none = trace(tmp_path / "elastic_pp2")
    weights = (tmp_path / "elastic_pp2" / "many-in-one" / "model.safetensors").read_bytes()
    for mode in ("full", "selective"):  # recomputation re-runs the very same ops: equal, not close
        run = tmp_path / f"elastic_pp2_{mode}"
        assert_same_trace(trace(run), none, rtol=0, atol=0)
        assert (run / "many-in-one" / "model.safetensors").read_bytes() == weights, mode

    # Teacher logits alive at once, per rank (the last stage holds them; the first none), by weakrefs in the
    # trainer: one micro-batch's, whether a step has 2 micro-batches or 4 (before: all of the step's).
    for run in ("elastic_pp2", "elastic_pp2_ga4"):
        assert [p["teacher_logits_peak"] for p in probes(tmp_path / run)] == [0, 1], run


def test_stage_split_honours_separators_and_balances_cost():
    from megatron_elastic.errors import ConfigError
    from megatron_elastic.model import HybridConfig, preset

    tiny = preset("tiny")
    split = HybridConfig(**(tiny.to_dict() | {"pattern": "M-|M*-M-"}))
    assert stage_layer_ranges(split, 2) == [range(2), range(2, 7)]
    with pytest.raises(ConfigError, match="parallel.pp=2"):
        stage_layer_ranges(HybridConfig(**(tiny.to_dict() | {"pattern": "M-|M*|-M-"})), 2)
    assert balanced_counts([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_counts([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    # the minimal largest stage over every contiguous split (brute force) on the tiny model's costs
    costs = layer_costs(tiny)
    for parts in (2, 3):
        counts = balanced_counts(costs, parts)
        assert sum(counts) == tiny.num_layers and min(counts) >= 1
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
                   for cuts in itertools.combinations(range(1, len(costs)), parts - 1))  # fmt: skip
        starts = [sum(counts[:i]) for i in range(parts + 1)]
        assert max(sum(costs[a:b]) for a, b in itertools.pairwise(starts)) == best
    assert [len(r) for r in stage_layer_ranges(tiny, 2)] == balanced_counts(costs, 2)
