"""Benchmark: serving every budget of a many-in-one checkpoint from one copy of the weights.

Memory: the process RSS (VmRSS after loading, building and running each model once) of four
fresh processes, measured one after another: the package imported with no model ("base"), the
parent alone, the parent plus every budget's *view* child (``ElasticModel.at_budget(B)``), and for
comparison the parent plus every budget's extracted copy (``contiguous=True``). Printed: RSS in
MiB and the ratios to the parent alone (goal: views <= 1.05x), also above the base (the part the
weights account for).

Latency: for each budget, the view child and the contiguous copy timed side by side in one loop
(no grad, interleaved, median of ``--repeats``): a prefill of ``--seq-len`` tokens and one
incremental decoding step after it. Printed: ms and the view / copy ratio.

Without ``--checkpoint`` a random parent of ``--hidden`` width is written as a many-in-one
checkpoint with three budgets that trim every axis (heads inside groups and Mamba head channels
included, so the view children have multi-block projections):

    .venv/bin/python bench/many_in_one.py
    .venv/bin/python bench/many_in_one.py --checkpoint runs/demo/elastic/many-in-one --seq-len 256
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a many-in-one checkpoint (default: a random one, written to a temp dir)")
    p.add_argument("--hidden", type=int, default=1024, help="width of the random parent (default ~0.2B parameters)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", nargs=2, metavar=("MODE", "CKPT"), help=argparse.SUPPRESS)  # child process
    return p.parse_args(argv)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def write_random_checkpoint(dst: Path, hidden: int) -> Path:
    from megatron_elastic.config.schema import ElasticConfig
    from megatron_elastic.elastic import ElasticSpace, Router, full_architecture, homogeneous, manyinone
    from megatron_elastic.elastic.space import child_config
    from megatron_elastic.model import HybridConfig, HybridLM, num_parameters

    h = hidden
    cfg = HybridConfig(pattern="M-M*-M-M-M*-M-", vocab_size=32000, hidden_size=h, ffn_hidden_size=3 * h,
                       num_attention_heads=h // 64, num_query_groups=4, head_dim=64, mamba_num_heads=h // 32,
                       mamba_head_dim=64, mamba_num_groups=4, mamba_state_dim=64, mamba_chunk_size=128)  # fmt: skip
    torch.manual_seed(0)
    parent = HybridLM(cfg).eval()
    mh = cfg.mamba_num_heads
    archs = [
        full_architecture(cfg),
        homogeneous(cfg, hidden=h * 7 // 8, ffn=cfg.ffn_hidden_size * 3 // 4, mamba_heads=mh * 3 // 4),
        homogeneous(cfg, hidden=h * 3 // 4, ffn=cfg.ffn_hidden_size // 2, attn_heads=cfg.num_attention_heads // 2,
                    mamba_heads=mh // 2, mamba_head_dim=48, drop_layers=(13,)),
    ]  # fmt: skip
    sizes = {"hidden": sorted({a.hidden_size for a in archs}, reverse=True),
             "ffn": [3 * h, 9 * h // 4, 3 * h // 2], "attn_heads": [h // 64, h // 128],
             "mamba_heads": [mh, mh * 3 // 4, mh // 2], "mamba_head_dim": [64, 48], "depth": [14, 13]}  # fmt: skip
    space = ElasticSpace.from_sizes(cfg, sizes, depth_order=list(range(13, -1, -1)))
    full = sum(num_parameters(cfg).values())
    budgets = [1.0, 0.75, 0.5]
    meta = manyinone.metadata(space, budgets, lambda i: archs[i],
                              cost_fraction=lambda i: sum(num_parameters(child_config(cfg, archs[i])).values()) / full,
                              cfg=ElasticConfig(router_hidden=16))  # fmt: skip
    manyinone.save(dst, model=parent, router=Router(space, budgets, hidden_size=16), metadata=meta)
    return dst


def measure(mode: str, ckpt: str) -> None:
    """One fresh process: load what ``mode`` says, run each model once on 16 tokens, print RSS as JSON."""
    import megatron_elastic

    torch.set_num_threads(1)
    tokens = torch.zeros(1, 16, dtype=torch.long)
    models = []
    if mode != "base":
        elastic = megatron_elastic.ElasticModel.load(ckpt)
        models.append(elastic.parent)
        if mode in ("views", "copies"):
            models += [elastic.at_budget(b, contiguous=mode == "copies") for b in elastic.budgets]
    with torch.no_grad():
        for m in models:
            m(tokens)
    gc.collect()
    print(json.dumps({"mode": mode, "rss_mib": rss_mib(), "models": len(models)}))


def bench_latency(ckpt: str, seq_len: int, repeats: int) -> list[dict]:
    import megatron_elastic

    elastic = megatron_elastic.ElasticModel.load(ckpt)
    gen = torch.Generator().manual_seed(0)
    vocab = elastic.parent.config.vocab_size
    prompt = torch.randint(0, vocab, (1, seq_len), generator=gen)
    step = torch.randint(0, vocab, (1, 1), generator=gen)
    rows = []
    for budget in elastic.budgets:
        pair = {"views": elastic.at_budget(budget), "contiguous": elastic.at_budget(budget, contiguous=True)}
        times = {(k, what): [] for k in pair for what in ("prefill", "decode")}
        with torch.no_grad():
            for m in pair.values():  # warm-up
                m.forward_cached(step, m.new_cache())
                m(prompt)
            caches = {}
            for _ in range(repeats):
                for k, m in pair.items():
                    t0 = time.perf_counter()
                    m(prompt)
                    times[(k, "prefill")].append(time.perf_counter() - t0)
                    cache = caches.get(k)
                    if cache is None:
                        cache = caches[k] = m.new_cache()
                        m.forward_cached(prompt, cache)
                    t0 = time.perf_counter()
                    m.forward_cached(step, cache)
                    times[(k, "decode")].append(time.perf_counter() - t0)
            diff = float((pair["views"](prompt[:, :64]) - pair["contiguous"](prompt[:, :64])).abs().max())
        med = {key: 1e3 * statistics.median(v) for key, v in times.items()}
        rows.append({"budget": budget, "params": pair["views"].num_parameters(), "max_abs_logit_diff": diff, **{
            f"{what}_ms_{k}": med[(k, what)] for (k, what) in med}})  # fmt: skip
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure:
        measure(*args.measure)
        return 0
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-many-in-one-") as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            print(f"[bench] writing a random many-in-one checkpoint (hidden {args.hidden}) ...", flush=True)
            ckpt = str(write_random_checkpoint(Path(tmp) / "many-in-one", args.hidden))
        rss = {}
        for mode in ("base", "parent", "views", "copies"):
            out = subprocess.run([sys.executable, __file__, "--measure", mode, ckpt], capture_output=True, text=True,
                                 check=True)  # fmt: skip
            rss[mode] = json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]
        rows = bench_latency(ckpt, args.seq_len, args.repeats)
    print("\nprocess RSS (MiB, fresh process each; base = package imported, no model):")
    print(f"  base {rss['base']:.0f}   parent {rss['parent']:.0f}   parent + views of every budget {rss['views']:.0f}"
          f"   parent + contiguous copies {rss['copies']:.0f}")  # fmt: skip
    def w(k):
        return rss[k] - rss["base"]

    print(f"  ratio to the parent alone: views {rss['views'] / rss['parent']:.3f}x (goal <= 1.05x), "
          f"copies {rss['copies'] / rss['parent']:.3f}x")  # fmt: skip
    print(f"  above base (weights): parent {w('parent'):.0f}, views {w('views'):.0f} ({w('views') / w('parent'):.3f}x), "
          f"copies {w('copies'):.0f} ({w('copies') / w('parent'):.3f}x)")  # fmt: skip
    print(f"\nlatency, batch 1, no grad, {args.threads} threads, median of {args.repeats} "
          f"(prefill: {args.seq_len} tokens; decode: one token after them):")
    print(f"{'budget':>7}{'params':>13}{'prefill views':>15}{'copy':>9}{'ratio':>8}{'decode views':>14}{'copy':>9}"
          f"{'ratio':>8}{'max|dlogit|':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['budget']:>7}{r['params']:>13,}{r['prefill_ms_views']:>13.1f}ms{r['prefill_ms_contiguous']:>7.1f}ms"
              f"{r['prefill_ms_views'] / r['prefill_ms_contiguous']:>7.2f}x{r['decode_ms_views']:>12.2f}ms"
              f"{r['decode_ms_contiguous']:>7.2f}ms{r['decode_ms_views'] / r['decode_ms_contiguous']:>7.2f}x"
              f"{r['max_abs_logit_diff']:>13.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
