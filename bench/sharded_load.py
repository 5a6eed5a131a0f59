"""Benchmark: peak host memory of a rank loading a parent, sharded loading at TP=2 vs TP=1.

A random parent (``--hidden``, ``--vocab``, ``--layers`` pattern repeats; default 682 MiB fp32) is
written as a native directory, then each measurement runs in fresh gloo processes (one per rank) and
reports how far the rank's peak resident set (VmHWM, reset just before) rose above its resident set
before the load:

* ``shards tp1`` / ``shards tp2``: ``parallel.loading.load_shards`` of the fp32 parent, at TP=1 (the
  whole model) and TP=2 (each rank reads only its half of the sharded tensors);
* ``trainer tp2, before``: what the parallel elastic trainer did before sharded loading, per rank:
  ``load_pretrained`` (the whole fp32 parent), a deep copy of it for the teacher, and tensor
  parallelism applied to both;
* ``trainer tp2``: what it does now: the fp32 student and the bf16 teacher (the compute dtype of a bf16
  run), each read from the rank's own blocks of the files;
* ``teacher copy, before`` / ``teacher copy``: the single-process elastic trainer's teacher of a loaded
  fp32 parent: a deep copy cast to bf16 (``copy.deepcopy(parent).to(bf16)``) vs ``cast_copy``.

Malloc's mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so freed blocks leave the process. The
peak includes the file pages a read maps (page cache, shared between the ranks of a node).

    .venv/bin/python bench/sharded_load.py
    .venv/bin/python bench/sharded_load.py --hidden 2048 --vocab 65536
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--layers", type=int, default=2, help="repeats of the tiny preset's 7-layer pattern")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _peak_growth(fn) -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    before = _status("VmRSS")
    kept = fn()
    peak = _status("VmHWM") - before
    del kept
    return peak


def _measure(mode: str, path: Path, group):
    from megatron_elastic.api import load_pretrained
    from megatron_elastic.model.hybrid import cast_copy
    from megatron_elastic.parallel.loading import load_shards
    from megatron_elastic.parallel.tensor import apply_tensor_parallel

    tp = (lambda m: m) if group is None else (lambda m: apply_tensor_parallel(m, group))
    if mode == "shards":
        return lambda: load_shards(path, tp, dtype=torch.float32, device="cpu")
    if mode == "trainer_before":
        def before():
            parent = load_pretrained(path).train()
            teacher = copy.deepcopy(parent)
            return tp(parent), tp(teacher)

        return before
    if mode == "trainer":
        return lambda: (load_shards(path, tp, dtype=torch.float32, device="cpu"),
                        load_shards(path, tp, dtype=torch.bfloat16, device="cpu"))  # fmt: skip
    parent = load_pretrained(path)  # the teacher-copy modes: the parent is loaded before the measurement
    if mode == "copy_before":
        return lambda: copy.deepcopy(parent).to(torch.bfloat16)
    assert mode == "copy", mode
    return lambda: cast_copy(parent, torch.bfloat16, "cpu")


def _worker(rank: int, port: int, world: int, mode: str, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import megatron.core.tensor_parallel.layers  # noqa: F401 - imported before the measurement

        fn = _measure(mode, Path(path), dist.group.WORLD if world > 1 else None)
        torch.save(_peak_growth(fn), Path(out) / f"{mode}_{world}_{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(mode: str, world: int, path: Path, out: Path) -> int:
    """The largest peak growth over the ranks of one measurement, in bytes."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, world, mode, str(path), str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * world, [p.exitcode for p in procs]
    return max(torch.load(out / f"{mode}_{world}_{r}.pt") for r in range(world))


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_elastic.convert import save_native
    from megatron_elastic.model import HybridLM, preset

    tiny = preset("tiny")
    config = dataclasses.replace(tiny, pattern=tiny.pattern * args.layers, hidden_size=args.hidden,
                                 vocab_size=args.vocab, ffn_hidden_size=3 * args.hidden)  # fmt: skip
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned processes' malloc
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = HybridLM(config)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        save_native(model, tmp / "parent")
        del model
        mib = 2**20
        print(f"parent: {config.num_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size}: "
              f"{size / mib:.0f} MiB fp32; peak resident growth per rank while loading:")  # fmt: skip
        rows = [("shards tp1", "shards", 1), ("shards tp2", "shards", 2), ("trainer tp2, before", "trainer_before", 2),
                ("trainer tp2", "trainer", 2), ("teacher copy, before", "copy_before", 1), ("teacher copy", "copy", 1)]  # fmt: skip
        peaks = {}
        for label, mode, world in rows:
            peaks[label] = run(mode, world, tmp / "parent", tmp)
            print(f"  {label:<22} {peaks[label] / mib:8.0f} MiB  ({peaks[label] / size:.2f} x the fp32 parent)", flush=True)
        print(f"sharded loading, TP=2 / TP=1: {peaks['shards tp2'] / peaks['shards tp1']:.3f}")
        print(f"parallel elastic trainer (student + teacher) at TP=2, now / before: "
              f"{peaks['trainer tp2'] / peaks['trainer tp2, before']:.3f}")  # fmt: skip
        print(f"single-process bf16 teacher copy, now / before: {peaks['teacher copy'] / peaks['teacher copy, before']:.3f}")


if __name__ == "__main__":
    main()
