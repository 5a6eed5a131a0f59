"""Sharded loading of a parent (parallel.loading) in real gloo processes: every rank's tensor- and
pipeline-parallel part equals, bit for bit, what splitting the whole loaded model gives (native and
Hugging Face directories, fp32 and a bf16 teacher), and a rank at TP=2 holds about half the memory
a rank at TP=1 holds while loading (peak resident set, measured in the loading process)."""

import dataclasses
import gc
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import save_parent
from spawning import spawn_ranks

from megatron_elastic.model import preset

TP = 2
# Non-trivial partitions everywhere: packed Mamba in_proj / conv1d (with biases), GQA, FFN biases.
EXACT = dataclasses.replace(preset("tiny"), mamba_proj_bias=True, mlp_bias=True)
# ~59 MB of fp32 weights (two thirds of it the 8192 x 512 embedding and output layer): far above the
# interpreter's noise.
BIG = dataclasses.replace(preset("tiny"), vocab_size=8192, hidden_size=512, ffn_hidden_size=1536)
MAX_RATIO = 0.6


def _status(key: str) -> int:
    """A field of /proc/self/status in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def peak_growth(fn) -> tuple[object, int]:
    """(fn(), how far the peak resident set rose above the resident set before the call). The kernel's
    high-water mark (VmHWM) is reset first (clear_refs 5), so earlier peaks of the process do not count."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - before


def _same(got: torch.nn.Module, want: torch.nn.Module, what: str) -> None:
    got_sd = {k: v for k, v in got.state_dict().items() if torch.is_tensor(v)}
    want_sd = {k: v for k, v in want.state_dict().items() if torch.is_tensor(v)}
    assert got_sd.keys() == want_sd.keys(), what
    for k, v in want_sd.items():
        assert got_sd[k].dtype == v.dtype and torch.equal(got_sd[k], v), (what, k)
    # megatron-core's attributes (gradient-norm de-duplication, checkpoints) survive materialisation
    attrs = ("tensor_model_parallel", "partition_dim", "sequence_parallel", "allreduce")
    want_p = dict(want.named_parameters())
    for k, p in got.named_parameters():
        assert [getattr(p, a, None) for a in attrs] == [getattr(want_p[k], a, None) for a in attrs], (what, k)


def _worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    try:
        from megatron_elastic.api import load_pretrained
        from megatron_elastic.parallel.loading import load_shards
        from megatron_elastic.parallel.pipeline import build_stage
        from megatron_elastic.parallel.tensor import apply_tensor_parallel

        group = dist.group.WORLD

        def tp(m):
            return apply_tensor_parallel(m, group)

        layouts = {"tp2": tp, **{f"tp2_pp2_stage{s}": (lambda m, s=s: build_stage(tp(m), 2, s)) for s in range(2)},
                   "pp2_stage1": lambda m: build_stage(m, 2, 1),
                   "tp2_sequence_parallel": lambda m: apply_tensor_parallel(m, group, sequence_parallel=True)}  # fmt: skip
        cases = [("native", name, torch.float32) for name in layouts]
        cases += [("hf", "tp2_pp2_stage1", torch.float32), ("native", "tp2_pp2_stage0", torch.bfloat16)]  # bf16 teacher
        for fmt, name, dtype in cases:
            path = Path(root) / fmt
            want = layouts[name](load_pretrained(path, dtype=dtype).train())  # the whole model, then split
            got = load_shards(path, layouts[name], dtype=dtype, device="cpu")
            _same(got, want, (fmt, name, dtype))
        big = Path(root) / "big"
        peaks = {}
        for name, parallelize in (("tp1", lambda m: m), ("tp2", tp)):
            model, peaks[name] = peak_growth(lambda: load_shards(big, parallelize, dtype=torch.float32, device="cpu"))
            peaks[f"{name}_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            del model
        torch.save({**peaks, "cases": len(cases)}, Path(out) / f"peaks{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def peaks(tmp_path_factory) -> list[dict]:
    from megatron_elastic.api import load_pretrained, save_model

    root = tmp_path_factory.mktemp("sharded")
    save_parent(root / "native", EXACT, seed=1)
    save_model(load_pretrained(root / "native"), root / "hf", fmt="hf")
    save_parent(root / "big", BIG, seed=2)
    # Fixed malloc threshold: blocks >= 64 KiB are mapped and go back to the system when freed, so one
    # load's peak is not hidden in heap memory an earlier load left behind.
    mp = pytest.MonkeyPatch()
    mp.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    try:
        spawn_ranks(_worker, str(root), str(root), world=TP, timeout=240)
    finally:
        mp.undo()
    return [torch.load(root / f"peaks{r}.pt") for r in range(TP)]


def test_shards_are_slices_of_the_whole_model(peaks):
    """The workers compared every layout's shards with the split whole model (bit-exact) before measuring."""
    assert [p["cases"] for p in peaks] == [7] * TP


def test_tp2_rank_peak_memory_is_about_half(peaks):
    for rank, p in enumerate(peaks):
        # a TP=1 rank holds the whole model; what the load adds on top of it is one tensor's file pages
        assert p["tp1"] >= p["tp1_bytes"], (rank, p)
        assert p["tp1"] < 1.5 * p["tp1_bytes"], (rank, p)
        print(f"rank {rank}: peak growth while loading {p['tp1'] / 2**20:.1f} MiB at TP=1, {p['tp2'] / 2**20:.1f} MiB "
              f"at TP=2: ratio {p['tp2'] / p['tp1']:.3f}")  # fmt: skip
        assert p["tp2"] / p["tp1"] <= MAX_RATIO, (rank, p["tp2"] / p["tp1"], p)
