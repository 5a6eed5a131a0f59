"""Benchmark: per-GPU memory of the 12B elastic run, item by item, with each memory feature on and off.

Prints, for the model and layout given (default: the paper's run, Nemotron Nano V2 12B at TP=8,
PP=1, DP=8, micro-batch 1, sequence 8,192 (stage 1) and 49,152 (stage 2), 768 sequences per step):

1. the scaling law: bytes per feature that every layer kind saves for backward in each recompute
   mode, fitted on small shapes measured with saved-tensor hooks (and the fit's worst residual);
2. measured vs predicted saved bytes of whole forwards of three small models not in the fit (and,
   with ``--tp2-check``, of a small model split by ``apply_tensor_parallel`` over two gloo
   processes, with and without sequence parallelism);
3. per sequence length, the per-GPU table of every item with every feature on, the total with each
   feature turned off in turn, and whether the total fits 80 GB with 10% to spare;
4. when a stage does not fit: the pipeline or context-parallel degree it would need.

Parameters per rank are counted on the meta device with the TP partition rules; nothing is
allocated at the target size. The numbers come from :mod:`megatron_elastic.parallel.memory`.

    .venv/bin/python bench/memory.py
    .venv/bin/python bench/memory.py --seq-lens 8192 --recompute full --tp 4 --pp 2 --dp 8
    .venv/bin/python bench/memory.py --tp2-check     # also measure a real TP=2 split (two processes, ~1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_elastic.model.config import HybridConfig, preset  # noqa: E402
from megatron_elastic.model.hybrid import HybridLM  # noqa: E402
from megatron_elastic.parallel import memory as mem  # noqa: E402

CHECK_CONFIGS = (  # small models (not among the fitted shapes) and their (batch, sequence)
    (dict(pattern="M*-M-", vocab_size=61, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
          num_query_groups=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2,
          mamba_state_dim=8, mamba_chunk_size=16), 2, 48),
    (dict(pattern="-M*M", vocab_size=96, hidden_size=56, ffn_hidden_size=112, num_attention_heads=8,
          num_query_groups=4, head_dim=12, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=4,
          mamba_state_dim=16, mamba_chunk_size=32), 1, 96),
    (dict(pattern="MM*--", vocab_size=80, hidden_size=24, ffn_hidden_size=72, num_attention_heads=3,
          num_query_groups=1, head_dim=16, mamba_num_heads=6, mamba_head_dim=10, mamba_num_groups=3,
          mamba_state_dim=4, mamba_chunk_size=8), 3, 40),
)  # fmt: skip


def print_law(layout: mem.MemoryLayout) -> None:
    acts = mem.fit_activation_model(layout.params_dtype, layout.compute_dtype, layout.elastic)
    print(f"saved-for-backward bytes per feature (params {layout.params_dtype}, compute {layout.compute_dtype}, "
          f"{'elastic masks' if layout.elastic else 'no masks'}): feature mixer|rest-of-block")  # fmt: skip
    for (kind, mode), fit in sorted(acts.fits.items()):
        terms = [f"{f} {m:.2f}|{r:.2f}" for f, m, r in zip(mem.FEATURES[kind], fit.mixer, fit.rest)
                 if abs(m) + abs(r) >= 0.005]  # fmt: skip
        print(f"  {kind:>9} {mode:<9} (residual {fit.max_rel_residual:5.2%}): " + ", ".join(terms))
    coef, resid = mem.fit_loss_model(vocab_parallel=layout.tp > 1)
    print(f"  KD + CE loss ({'vocab-parallel' if layout.tp > 1 else 'dense'}): {coef[0]:.2f}*b*L*V {coef[1]:+.2f}*b*L "
          f"(residual {resid:.2%})")  # fmt: skip


def print_checks(layout: mem.MemoryLayout) -> float:
    print("\nmeasured vs predicted saved bytes of whole single-device forwards (small shapes, not fitted)")
    worst = 0.0
    for raw, b, L in CHECK_CONFIGS:
        config = HybridConfig(**raw)
        model = HybridLM(config).to(mem.DTYPES[layout.params_dtype])
        for mode in ("none", "selective", "full"):
            measured, copies = mem.measure_model(model, mode, b, L, masked=layout.elastic,
                                                 params_dtype=layout.params_dtype, compute_dtype=layout.compute_dtype)
            predicted = mem.predict_model(config, mode, b, L, masked=layout.elastic, params_dtype=layout.params_dtype,
                                          compute_dtype=layout.compute_dtype)  # fmt: skip
            worst = max(worst, abs(predicted / measured - 1))
            print(f"  {config.pattern:<7} b={b} L={L:<3} {mode:<9} measured {measured:>9,d} B  predicted "
                  f"{predicted:>11,.0f} B  ({predicted / measured - 1:+.2%})")  # fmt: skip
    print(f"  worst relative error: {worst:.2%}")
    return worst


TP2_CONFIG = dict(pattern="M*-M-", vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                  num_query_groups=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2,
                  mamba_state_dim=8, mamba_chunk_size=16)  # fmt: skip


def _tp2_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from megatron_elastic.model.hybrid import set_recompute
    from megatron_elastic.parallel.tensor import apply_tensor_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    config, (b, L) = HybridConfig(**TP2_CONFIG), (2, 64)
    rows = []
    for sp in (False, True):
        torch.manual_seed(0)  # the same single-device weights on both ranks, then this rank's shard
        model = apply_tensor_parallel(HybridLM(config).to(torch.bfloat16), dist.group.WORLD, sequence_parallel=sp)
        for masked in (True, False):
            for mode in ("none", "selective", "full"):
                set_recompute(model, mode)
                state = mem.elastic_masks(config) if masked else None
                tokens = torch.randint(0, config.vocab_size, (b, L), generator=torch.Generator().manual_seed(1))
                with mem.count_saved(model.parameters()) as saved:
                    logits = model(tokens, elastic=state)
                del logits
                predicted = mem.predict_model(config, mode, b, L, masked=masked, params_dtype="bfloat16",
                                              compute_dtype="bfloat16", tp=2, sequence_parallel=sp)  # fmt: skip
                rows.append((sp, masked, mode, saved.bytes(), predicted))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def print_tp2_check() -> None:
    """A real TP=2 split (bf16 weights) on two gloo processes: rank 0's saved bytes vs the model."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "tp2.json")
        mp.spawn(_tp2_worker, args=(port, out), nprocs=2)
        rows = json.loads(Path(out).read_text())
    print("\nmeasured vs predicted saved bytes on rank 0 of a TP=2 split (apply_tensor_parallel, two gloo processes)")
    for sp, masked, mode, measured, predicted in rows:
        kind = "elastic" if masked else "plain"
        print(f"  sequence_parallel={sp!s:<5} {kind:<7} {mode:<9} measured {measured:>9,d} B  predicted "
              f"{predicted:>11,.0f} B  ({predicted / measured - 1:+.2%})")  # fmt: skip


def print_stage(config: HybridConfig, layout: mem.MemoryLayout, capacity: float) -> None:
    print(f"\n=== seq_len {layout.seq_len:,}: tp={layout.tp} pp={layout.pp} dp={layout.dp} micro-batch "
          f"{layout.micro_batch_size}, {layout.grad_accum} micro-batches per step, {layout.budgets_per_micro_batch} "
          f"budget(s) per micro-batch ===")  # fmt: skip
    on = mem.estimate_memory(config, layout)
    columns = {"all on": on}
    for name, (with_it, without) in mem.feature_variants(layout).items():
        if with_it == layout:
            columns[f"-{name}"] = mem.estimate_memory(config, without)
    print(f"features on: params {layout.params_dtype}, distributed optimizer {layout.distributed_optimizer}, "
          f"recompute {layout.recompute}, sequence parallel {layout.sequence_parallel}, teacher "
          f"{layout.teacher_dtype}; a column '-X' turns feature X off")  # fmt: skip
    print(mem.format_table(columns, capacity=capacity))
    for mode in ("full", "selective", "none"):
        other = dataclasses.replace(layout, recompute=mode)
        e = mem.estimate_memory(config, other)
        print(f"recompute={mode}: {e.total / mem.GB:.2f} GB ({'fits' if e.fits(capacity) else 'does not fit'})")
        if not e.fits(capacity):
            print(needs(config, other, capacity))


def needs(config: HybridConfig, layout: mem.MemoryLayout, capacity: float) -> str:
    """The smallest pipeline degree, and the context-parallel degree, that would fit."""
    out = [f"  with recompute={layout.recompute} at tp={layout.tp} (the most 8 KV heads and 8 Mamba groups split "
           "over) it needs:"]  # fmt: skip
    for pp in (2, 4, 8, 16):
        if pp > config.num_layers:
            break
        e = mem.estimate_memory(config, dataclasses.replace(layout, pp=pp))
        biggest = max(e.items, key=lambda i: i.bytes)
        fits = " (fits)" if e.fits(capacity) else ""
        out.append(f"    pp={pp} (stage {e.pp_rank}): {e.total / mem.GB:.2f} GB{fits}; largest item: {biggest.name} "
                   f"{biggest.bytes / mem.GB:.2f} GB ({biggest.note})")  # fmt: skip
        if e.fits(capacity):
            break
    on = mem.estimate_memory(config, layout)
    tokens = sum(on.item(n) for n in ("activations", "recompute working set", "teacher logits", "student logits",
                                      "KD + CE buffers"))  # fmt: skip
    rest = on.total - tokens
    for cp in (2, 4, 8):
        total = rest + tokens / cp
        fits = " (fits)" if total <= capacity * 0.9 else ""
        out.append(f"    context parallel cp={cp} (not implemented; token-proportional items / cp): "
                   f"{total / mem.GB:.2f} GB{fits}")  # fmt: skip
        if total <= capacity * 0.9:
            break
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="nemotron-nano-12b-v2")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=768)
    p.add_argument("--budgets", type=int, default=3, help="budgets trained per micro-batch (the paper: 3)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 49152])
    p.add_argument("--recompute", default="full", choices=("none", "selective", "full"))
    p.add_argument("--capacity-gb", type=float, default=80.0)
    p.add_argument("--skip-checks", action="store_true", help="do not print the measured-vs-predicted check")
    p.add_argument("--tp2-check", action="store_true", help="also measure a TP=2 split on two gloo processes")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    torch.manual_seed(0)
    config = preset(args.preset)
    start = time.perf_counter()
    layout = mem.MemoryLayout(tp=args.tp, pp=args.pp, dp=args.dp, sequence_parallel=args.tp > 1,
                              micro_batch_size=args.micro_batch, seq_len=args.seq_lens[0],
                              grad_accum=args.global_batch // (args.micro_batch * args.dp), recompute=args.recompute,
                              params_dtype="bfloat16", distributed_optimizer=True, teacher_dtype="bfloat16",
                              budgets_per_micro_batch=args.budgets)  # fmt: skip
    total, per_rank = (sum(mem.rank_parameter_counts(config, tp=t).values()) for t in (1, args.tp))
    print(f"{args.preset}: {total:,} parameters; per rank at tp={args.tp}: {per_rank:,}")
    print_law(layout)
    if not args.skip_checks:
        print_checks(layout)
    if args.tp2_check:
        print_tp2_check()
    for seq in args.seq_lens:
        print_stage(config, dataclasses.replace(layout, seq_len=seq), args.capacity_gb * mem.GB)
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
