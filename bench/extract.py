"""Benchmark: CPU latency of extracted children vs the parent and vs the masked parent.

For target parameter fractions (default 75 %, 50 %, 30 %) a homogeneous architecture is chosen by
shrinking every width axis by a common factor (hidden, FFN, attention heads per KV group, Mamba
heads per group, Mamba head_dim; multiples of the group counts) until the child's parameter
count is closest to the target. For each target, three forwards on the same tokens are timed side
by side in one loop (no grad, interleaved, median): the parent, the parent under that budget's
masks (what elastic training runs), and the sliced child (what is deployed). Printed: parameters,
median ms, and ratios to the parent (goal: the 50 % child runs in <= 0.6x the parent's time),
plus the max |logit difference| masked vs sliced.

    .venv/bin/python bench/extract.py
    .venv/bin/python bench/extract.py --hidden 768 --seq-len 1024 --targets 0.75 0.5 0.3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.elastic import extract, hard_state, homogeneous  # noqa: E402
from megatron_elastic.elastic.space import child_config  # noqa: E402
from megatron_elastic.model import HybridConfig, HybridLM, num_parameters  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pattern", default="M-M*-M-M-")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048, help="2048: embeddings ~11%% of the parameters, as in Nemotron Nano 12B")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def parent_config(a) -> HybridConfig:
    d = a.hidden
    return HybridConfig(
        pattern=a.pattern, vocab_size=a.vocab, hidden_size=d, ffn_hidden_size=4 * d, num_attention_heads=8,
        num_query_groups=2, head_dim=d // 8, mamba_num_heads=16, mamba_head_dim=2 * d // 16, mamba_num_groups=2,
        mamba_state_dim=64, mamba_chunk_size=128,
    )  # fmt: skip


def scaled(cfg: HybridConfig, s: float):
    def r(full, groups=1):
        return max(groups, int(round(full * s / groups)) * groups)

    return homogeneous(cfg, hidden=r(cfg.hidden_size, 8), ffn=r(cfg.ffn_hidden_size, 8),
                       attn_heads=r(cfg.num_attention_heads, cfg.num_query_groups),
                       mamba_heads=r(cfg.mamba_num_heads, cfg.mamba_num_groups),
                       mamba_head_dim=r(cfg.mamba_head_dim, 4))  # fmt: skip


def arch_for(cfg: HybridConfig, target: float):
    total = sum(num_parameters(cfg).values())
    best = None
    for i in range(1, 201):
        arch = scaled(cfg, i / 200)
        frac = sum(num_parameters(child_config(cfg, arch)).values()) / total
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (arch, frac)
    return best


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = parent_config(a)
    parent = HybridLM(cfg).eval()
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq_len))
    runs = {"parent": lambda: parent(tokens)}
    info = {}
    for t in a.targets:
        arch, frac = arch_for(cfg, t)
        state = hard_state(cfg, arch)
        child = extract(parent, arch).eval()
        runs[f"masked {t:.0%}"] = (lambda s=state: parent(tokens, elastic=s))
        runs[f"child {t:.0%}"] = (lambda c=child: c(tokens))
        with torch.no_grad():
            diff = (parent(tokens, elastic=state) - child(tokens)).abs().max().item()
        info[t] = (frac, child.num_parameters(), diff, child.config)
    times = {k: [] for k in runs}
    names = list(runs)
    with torch.no_grad():
        for i in range(a.warmup + a.repeats):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                t0 = time.perf_counter()
                runs[name]()
                if i >= a.warmup:
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"forward latency on CPU ({torch.get_num_threads()} threads), batch {a.batch} x seq {a.seq_len}; parent "
          f"{cfg.pattern} hidden {cfg.hidden_size}, {parent.num_parameters():,} params; median of {a.repeats}\n")  # fmt: skip
    print(f"{'model':<16}{'params':>14}{'% params':>10}{'median ms':>12}{'x parent':>10}")
    print("-" * 62)
    print(f"{'parent':<16}{parent.num_parameters():>14,}{100.0:>9.1f}%{1000 * med['parent']:>12.1f}{1.0:>10.2f}")
    for t in a.targets:
        frac, n, diff, c = info[t]
        for kind in ("masked", "child"):
            key = f"{kind} {t:.0%}"
            shown = parent.num_parameters() if kind == "masked" else n
            print(f"{key:<16}{shown:>14,}{100 * frac:>9.1f}%{1000 * med[key]:>12.1f}{med[key] / med['parent']:>10.2f}")
    print()
    for t in a.targets:
        frac, n, diff, c = info[t]
        print(f"target {t:.0%}: child hidden {c.hidden_size}, ffn {c.ffn_hidden_size}, attn heads {c.num_attention_heads}, "
              f"mamba heads {c.mamba_num_heads} x {c.mamba_head_dim}; max |masked - sliced| logits {diff:.2e}; "
              f"child/parent time {med[f'child {t:.0%}'] / med['parent']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
