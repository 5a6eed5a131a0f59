"""Benchmark: tokens/s of one full training step, ours vs transformers' NemotronH, on CPU.

A training step = forward on (batch, seq_len) tokens, next-token cross-entropy, backward, AdamW
step. Both models have the same shape (a preset, default ``tiny``) and the same weights (ours is
exported into a ``transformers.NemotronHForCausalLM`` through the project's converter), both in
train mode, both fp32 on CPU (transformers uses its pure-PyTorch path: no mamba-ssm on CPU).
After warmup, each timed round runs both, alternating which goes first; the median is reported,
with the ratio ours / transformers (tokens/s) and the max |difference| of the first step's loss.

    .venv/bin/python bench/train_step.py
    .venv/bin/python bench/train_step.py --batch 4 --seq-len 512 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.convert.hf import config_to_hf, state_to_hf  # noqa: E402
from megatron_elastic.model import HybridLM, preset  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args):
    import warnings

    from transformers import NemotronHConfig, NemotronHForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    ours = HybridLM(preset(args.preset)).train()
    hf_cfg = {k: v for k, v in config_to_hf(ours.config).items() if k not in ("architectures", "model_type")}
    hf = NemotronHForCausalLM(NemotronHConfig(**hf_cfg)).train()
    state = {k.replace("backbone.", "model.", 1): v for k, v in state_to_hf(ours.state_dict(), tied=False).items()}
    hf.load_state_dict(state, strict=True)
    return ours, hf


def step(kind, model, opt, tokens):
    t0 = time.perf_counter()
    logits = model(tokens[:, :-1]) if kind == "ours" else model(tokens[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, hf = build(args)
    vocab = ours.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=gen)
               for _ in range(args.warmup + args.repeats)]  # fmt: skip
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-3), "transformers": torch.optim.AdamW(hf.parameters(), lr=1e-3)}
    models = {"ours": ours, "transformers": hf}
    times = {"ours": [], "transformers": []}
    first_loss = {}
    for i, tokens in enumerate(batches):
        order = ["ours", "transformers"] if i % 2 == 0 else ["transformers", "ours"]
        for kind in order:
            dt, loss = step(kind, models[kind], opts[kind], tokens)
            first_loss.setdefault(kind, loss)
            if i >= args.warmup:
                times[kind].append(dt)
    tokens_per_step = args.batch * args.seq_len
    c = ours.config
    print(f"training step on CPU ({torch.get_num_threads()} threads): preset {args.preset} ({c.pattern}, "
          f"{ours.num_parameters():,} params), batch {args.batch} x seq {args.seq_len}; median of {args.repeats}")  # fmt: skip
    print(f"{'implementation':<26}{'median step ms':>16}{'tokens/s':>12}")
    print("-" * 54)
    med = {k: statistics.median(v) for k, v in times.items()}
    for kind in ("ours", "transformers"):
        print(f"{kind:<26}{1000 * med[kind]:>16.1f}{tokens_per_step / med[kind]:>12,.0f}")
    print(f"\ntokens/s ratio (ours / transformers): {med['transformers'] / med['ours']:.2f}x")
    print(f"first-step loss: ours {first_loss['ours']:.6f}, transformers {first_loss['transformers']:.6f}, "
          f"|diff| {abs(first_loss['ours'] - first_loss['transformers']):.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
