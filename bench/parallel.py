"""Benchmark: training-step time at TP=2 and PP=2 relative to TP=1, two gloo processes on CPU.

Two processes (one thread each) run, side by side and in alternating order each round:

* ``tp1``: every rank trains the whole model alone (the single-device baseline, measured while the
  other rank does the same, so both layouts see the same CPU contention);
* ``tp2``: the model split over both ranks by ``apply_tensor_parallel`` (vocabulary-parallel loss);
* ``pp2``: the layer list cut into two stages, run by megatron-core's 1F1B schedule.

A step = forward + backward over ``--micro-batches`` micro-batches of ``--batch`` x ``--seq-len``
tokens (gradient accumulation for tp1 / tp2, pipelining for pp2) + AdamW. Steps start and end at a
barrier; the median over ``--repeats`` rounds is printed with the ratios layout / tp1 (< 1 = faster).
On a CPU the collectives are gloo over loopback, so the ratios measure our layouts' overheads, not
the speedups NVLink gives. megatron-core's pipeline schedule allocates buffers on CUDA: on CPU this
benchmark uses the test-support shim ``tests/mcore_cpu_shim.py`` (as the distributed tests do).

    .venv/bin/python bench/parallel.py
    .venv/bin/python bench/parallel.py --preset tiny --batch 4 --seq-len 256 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAYOUTS = ("tp1", "tp2", "pp2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=4, help="samples per micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Layout:
    def __init__(self, name: str, args, rank: int, world_group, groups):
        from megatron_elastic.model import HybridLM, preset

        torch.manual_seed(0)
        model = HybridLM(preset(args.preset)).train()
        self.name, self.group, self.runner = name, world_group, None
        if name == "tp2":
            from megatron_elastic.parallel.tensor import apply_tensor_parallel

            model = apply_tensor_parallel(model, world_group)
        elif name == "pp2":
            from megatron_elastic.parallel.pipeline import PipelineRunner, build_stage, mcore_pipeline_config

            mcfg = mcore_pipeline_config(hidden_size=model.config.hidden_size, tp=1, pp=2)
            model = build_stage(model, 2, rank, mcore_config=mcfg)
            self.runner = PipelineRunner(model, groups)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

    def loss(self, logits, labels):
        if self.name == "tp2":
            from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy

            return vocab_parallel_cross_entropy(logits, labels, self.group)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def step(self, batches) -> None:
        if self.runner is None:
            for tokens, labels in batches:
                (self.loss(self.model(tokens), labels) / len(batches)).backward()
        else:

            def fwd(item, stage):
                tokens, labels = item
                return stage(tokens), (lambda logits: (self.loss(logits, labels), {}))

            self.runner.run(fwd, batches, seq_length=batches[0][0].shape[1], micro_batch_size=batches[0][0].shape[0])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _worker(rank: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    import warnings

    warnings.filterwarnings("ignore")
    import mcore_cpu_shim

    from megatron_elastic.parallel.groups import ParallelGroups, build_groups, destroy_parallel

    mcore_cpu_shim.install()
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        base = build_groups(1, 1, device=torch.device("cpu"))  # megatron's groups (its context-parallel slot)
        world = dist.group.WORLD
        pp_groups = ParallelGroups(tp=base.tp, pp=world, dp=base.tp, embedding=None, pp_size=2, pp_rank=rank,
                                   rank=rank, world_size=2)  # fmt: skip
        layouts = {name: Layout(name, args, rank, world, pp_groups) for name in LAYOUTS}
        gen = torch.Generator().manual_seed(1)
        vocab = layouts["tp1"].model.config.vocab_size
        batches = [(torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen),
                    torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen))
                   for _ in range(args.micro_batches)]  # fmt: skip
        times = {name: [] for name in LAYOUTS}
        for r in range(args.warmup + args.repeats):
            order = LAYOUTS[r % 3:] + LAYOUTS[: r % 3]
            for name in order:
                dist.barrier()
                t0 = time.perf_counter()
                layouts[name].step(batches)
                dist.barrier()
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
            if rank == 0:
                print(f"round {r + 1}/{args.warmup + args.repeats}" + (" (warmup)" if r < args.warmup else ""),
                      file=sys.stderr, flush=True)  # fmt: skip
        if rank == 0:
            out.put({name: statistics.median(t) for name, t in times.items()})
    finally:
        destroy_parallel()


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=1800)
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print(f"worker exit codes {[p.exitcode for p in procs]}", file=sys.stderr)
        return 1
    tokens = args.batch * args.seq_len * args.micro_batches
    print(f"preset {args.preset}, {args.micro_batches} micro-batches x {args.batch} x {args.seq_len} tokens per step, "
          f"2 gloo processes x 1 thread, median of {args.repeats}")  # fmt: skip
    for name in LAYOUTS:
        print(f"  {name}: {result[name] * 1000:8.1f} ms/step  {tokens / result[name]:9.0f} tokens/s  "
              f"ratio to tp1 {result[name] / result['tp1']:.2f}")  # fmt: skip
    print(f"step-time ratios: tp2/tp1 = {result['tp2'] / result['tp1']:.2f}, pp2/tp1 = {result['pp2'] / result['tp1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
