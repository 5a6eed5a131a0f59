"""TP=2 (2 real gloo processes) in the parallel trainers reproduces the single-process loss traces,
plain and elastic (vocabulary-parallel CE / KD, masks cut per rank from the global state, router
replicated); the many-in-one parent streamed from the shards matches the single-process run's and
equals the single-process export of the run's own last checkpoint byte for byte, the writer holding at
most two full tensors' worth of buffers."""

from layouts import assert_same_parent, assert_same_trace, assert_streamed_export, spawn_layout, trace


def test_tp2_reproduces_single_process(layout_root):
    root = layout_root
    spawn_layout(root, tp=2, pp=1, runs=[("plain", "tp2"), ("elastic", "elastic_tp2")])
    assert_same_trace(trace(root / "tp2"), trace(root / "single"))
    ref = trace(root / "elastic_single")
    assert any(k.startswith("kd_loss/b0.") for r in ref for k in r)  # masked budgets were trained
    assert_same_trace(trace(root / "elastic_tp2"), ref)
    assert_same_parent(root, "elastic_tp2")
    assert_streamed_export(root / "elastic_tp2")
