"""TP=2 x PP=2 (4 real gloo processes) in the parallel trainers reproduces the single-process loss
traces, plain and elastic (budgets sampled, masks cut per rank from the global state, teacher split
like the student); checkpoints reshard TP=2 x PP=2 -> one process and one process -> TP=2 x PP=2
and continue the single-process trace; the many-in-one parent gathered from the shards matches."""

from layouts import (
    SAVE_AT,
    STEPS,
    assert_same_parent,
    assert_same_trace,
    reference_runs,
    resume_copy,
    spawn_layout,  # fmt: skip
    trace,
    train,
)


def test_tp2_pp2_reproduces_single_process_and_reshards(tmp_path):
    root = reference_runs(tmp_path)
    resume_copy(root / "single", root / "single_then_tp2pp2", SAVE_AT)
    spawn_layout(root, tp=2, pp=2, runs=[("plain", "tp2pp2"), ("plain", "single_then_tp2pp2"),
                                          ("elastic", "elastic_tp2pp2")])  # fmt: skip
    want = trace(root / "single")
    assert len(want) == STEPS
    assert_same_trace(trace(root / "tp2pp2"), want)
    assert_same_trace(trace(root / "single_then_tp2pp2"), want)  # one process -> TP=2 x PP=2
    back = resume_copy(root / "tp2pp2", root / "tp2pp2_then_single", SAVE_AT)  # TP=2 x PP=2 -> one process
    assert train("plain", root, back) == 0
    assert_same_trace(trace(back), want)
    ref = trace(root / "elastic_single")
    assert any(k.startswith("kd_loss/b0.") for r in ref for k in r)  # masked budgets were trained
    assert_same_trace(trace(root / "elastic_tp2pp2"), ref)
    assert_same_parent(root, "elastic_tp2pp2")
