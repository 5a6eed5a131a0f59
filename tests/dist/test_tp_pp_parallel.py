"""TP=2 x PP=2 (4 real gloo processes) in the parallel trainers reproduces the single-process loss
traces, plain and elastic (budgets sampled, masks cut per rank from the global state, teacher split
like the student); checkpoints reshard TP=2 x PP=2 -> one process and one process -> TP=2 x PP=2
and continue the single-process trace; the many-in-one parent streamed from the shards matches, and
equals the single-process export of the run's last checkpoint byte for byte (the writer holding at most
two full tensors' worth of buffers); the TP=2 x PP=2 checkpoint (megatron-core dist_checkpointing) is
read back by megatron-core alone with a TP=1 sharded state dict and equals the streamed parent bit for bit."""

import os
import pickle

from layouts import (
    SAVE_AT,
    STEPS,
    assert_same_parent,
    assert_same_trace,
    assert_streamed_export,
    resume_copy,
    spawn_layout,  # fmt: skip
    trace,
    train,
)


def test_tp2_pp2_reproduces_single_process_and_reshards(layout_root):
    root = layout_root
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
    assert_streamed_export(root / "elastic_tp2pp2")
    assert_megatron_core_reads_tp2pp2_checkpoint(root / "elastic_tp2pp2", root / "elastic_tp2pp2" / "many-in-one")


def assert_megatron_core_reads_tp2pp2_checkpoint(run_dir, gathered) -> None:
    """megatron-core alone, in this plain process, reads the TP=2 x PP=2 checkpoint with a TP=1
    sharded state dict (full-size tensors under the layout-independent component keys): the
    tensors equal the parent streamed from the shards at the same step. A damaged copy fails with
    one line."""
    import shutil

    import pytest
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing as dc
    from megatron.core.dist_checkpointing import ShardedTensor
    from safetensors.torch import load_file

    from megatron_elastic.config import TrainConfig
    from megatron_elastic.convert.native import read_native_config
    from megatron_elastic.errors import CheckpointError
    from megatron_elastic.model import HybridLM
    from megatron_elastic.model.layout import component_layout
    from megatron_elastic.checkpoint import dist as dist_ckpt
    from megatron_elastic.checkpoint import native as ckpt
    from megatron_elastic.training.trainer import build_optimizer

    root = run_dir / "checkpoints"
    path = root / (root / "latest").read_text().strip()
    assert ckpt.is_dist_checkpoint(path) and not list(root.glob(".*tmp*"))  # published, nothing left over
    assert len(list(path.glob("*.distcp"))) == 4  # each of the 4 ranks wrote its own pieces
    want = load_file(gathered / "model.safetensors")
    config = read_native_config(gathered)
    comps = {n: component_layout(config, n, v.dim(), 1) for n, v in want.items()}
    assert sum(len(c) for c in comps.values()) > len(comps)  # packed parameters are stored per component
    sd = {c.key: ShardedTensor.from_rank_offsets(c.key, torch.empty_like(want[n][c.local_slice]), replica_id=0)
          for n, cs in comps.items() for c in cs}  # fmt: skip
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        meta = dc.load_tensors_metadata(str(path))
        got = dc.load(sd, str(path))
    finally:
        dist.destroy_process_group()
    for key in sd:  # the AdamW moments are stored under the same keys
        assert f"optim.exp_avg.{key}" in meta and f"optim.exp_avg_sq.{key}" in meta, key
    for n, cs in comps.items():
        for c in cs:
            torch.testing.assert_close(got[c.key], want[n][c.local_slice], rtol=0, atol=0)

    broken = run_dir.parent / "broken_ckpt"
    shutil.copytree(path, broken)
    shard = min(broken.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated by a full disk
    model = HybridLM(config)
    optimizer = build_optimizer(model, TrainConfig())
    with pytest.raises(CheckpointError) as err:
        dist_ckpt.load_checkpoint(broken, model=model, optimizer=optimizer)
    assert "\n" not in str(err.value) and "corrupt" in str(err.value)
    (broken / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"lacks \.metadata"):
        ckpt.validate_checkpoint(broken, config)
    # torch.distributed.checkpoint unpickles .metadata and the byte entries (the RNG states) without
    # restriction: a hostile pickle planted in either is refused before that, and never runs
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    with open(path / ".metadata", "rb") as f:
        meta = pickle.load(f)  # written by the run above
    fqn = next(k for k, m in meta.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata))
    entry = meta.storage_data[MetadataIndex(fqn)]
    for target in (".metadata", fqn):
        hostile, marker = run_dir.parent / f"hostile{len(target)}", run_dir.parent / f"ran{len(target)}"
        shutil.copytree(path, hostile)
        payload = pickle.dumps(Hostile(marker))
        if target == ".metadata":
            (hostile / ".metadata").write_bytes(payload)
        else:
            assert len(payload) <= entry.length
            data = bytearray((hostile / entry.relative_path).read_bytes())
            data[entry.offset:entry.offset + entry.length] = payload.ljust(entry.length, b".")
            (hostile / entry.relative_path).write_bytes(bytes(data))
        with pytest.raises(CheckpointError) as err:
            dist_ckpt.load_checkpoint(hostile, model=model, optimizer=optimizer)
        assert "\n" not in str(err.value) and "could run code" in str(err.value), str(err.value)
        assert not marker.exists(), f"a hostile {target} ran code"


class Hostile:
    """Unpickling this creates ``marker``: what a checkpoint from an attacker would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))
