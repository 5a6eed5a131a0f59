"""TP=2 (2 real gloo processes) in the parallel trainers reproduces the single-process loss traces,
plain (also with megatron-core's distributed optimizer, resumed exactly from its checkpoint) and elastic (vocabulary-parallel CE / KD, masks cut per rank from the global state, router
replicated); the many-in-one parent streamed from the shards matches the single-process run's and
equals the single-process export of the run's own last checkpoint byte for byte, the writer holding at
most two full tensors' worth of buffers."""

import pytest
from layouts import (SAVE_AT, assert_same_parent, assert_same_trace, assert_streamed_export, resume_copy,
                     spawn_layout, trace, train_one_rank)  # fmt: skip

from megatron_elastic.errors import CheckpointError

DOPT = ("parallel.distributed_optimizer=true",)


def test_tp2_reproduces_single_process(layout_root):
    root = layout_root
    spawn_layout(root, tp=2, pp=1, runs=[("plain", "tp2"), ("elastic", "elastic_tp2"), ("plain", "dopt_tp2", DOPT),
                                         ("resume:dopt_tp2", "dopt_tp2_resumed", DOPT)])  # fmt: skip
    assert_same_trace(trace(root / "tp2"), trace(root / "single"))
    # megatron-core's DDP + distributed optimizer at TP=2 (its state checkpointed per TP rank): the same
    # trace, and a resume from its checkpoint continues it exactly
    assert_same_trace(trace(root / "dopt_tp2"), trace(root / "single"))
    exact = [(r["step"], r["loss"], r["grad_norm"]) for r in trace(root / "dopt_tp2_resumed")]
    assert exact == [(r["step"], r["loss"], r["grad_norm"]) for r in trace(root / "dopt_tp2")]
    moved = resume_copy(root / "dopt_tp2", root / "dopt_tp2_at_tp1", SAVE_AT)  # its optimizer state is TP-bound
    with pytest.raises(CheckpointError, match=r"written at tp=2 pp=1, which reshards over data parallelism only; "
                                              r"resume at parallel.tp=2 parallel.pp=1 \(any dp\)$"):  # fmt: skip
        train_one_rank("plain", root, moved, ("parallel.distributed_optimizer=true",))
    ref = trace(root / "elastic_single")
    assert any(k.startswith("kd_loss/b0.") for r in ref for k in r)  # masked budgets were trained
    assert_same_trace(trace(root / "elastic_tp2"), ref)
    assert_same_parent(root, "elastic_tp2")
    assert_streamed_export(root / "elastic_tp2")
