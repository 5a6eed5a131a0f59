"""Benchmark: the cost of elastic training steps, measured side by side in one run.

P1  elastic step at the full budget (router sampled, masks built, full architecture)
    / plain training step of the same model                                   goal <= 1.03
P2  nested step with three budgets against one teacher forward
    / (one teacher forward + three student forward+backward, no router)         goal <= 1.05

Both sides of each ratio run on the same model, batch and device; rounds alternate which side goes
first; medians are reported. The model is the ``--preset`` shape (default ``tiny``), fp32 on CPU.

    .venv/bin/python bench/elastic_step.py
    .venv/bin/python bench/elastic_step.py --batch 8 --seq-len 256 --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.distill.losses import cross_entropy, forward_kl  # noqa: E402
from megatron_elastic.elastic.costs import Cost, router_loss  # noqa: E402
from megatron_elastic.elastic.router import Router  # noqa: E402
from megatron_elastic.elastic.search_space import ElasticSpace  # noqa: E402
from megatron_elastic.model import HybridLM, preset  # noqa: E402
from megatron_elastic.training.trainer import build_optimizer  # noqa: E402
from megatron_elastic.config.schema import TrainConfig  # noqa: E402

BUDGETS = [1.0, 0.75, 0.5]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = preset(a.preset)
    model = HybridLM(cfg).train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    space = ElasticSpace(cfg, hidden=[1.0, 0.75, 0.5], ffn=[1.0, 0.75, 0.5, 0.25], attn_heads=[1.0, 0.5],
                         mamba_heads=[1.0, 0.75, 0.5], mamba_head_dim=[1.0, 0.75], depth=[1.0, 0.86])  # fmt: skip
    router = Router(space, BUDGETS)
    cost = Cost(space, "params")
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    opt.add_param_group({"params": list(router.parameters()), "weight_decay": 0.0})
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def finish():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain():
        cross_entropy(model(x), y).backward()
        finish()

    def elastic_full():
        # Budget 1.0 through the router's machinery: sample, build the masks of its (full) choice.
        s = router.sample(0, tau=0.5, scale=5.0, mode="hard", generator=gen)
        loss = cross_entropy(model(x, elastic=s.state), y) + router_loss(cost(s.probs), 1.0, cost.full)
        loss.backward()
        finish()

    def nested():
        with torch.no_grad():
            t = teacher(x)
        for b, budget in enumerate(BUDGETS):
            s = router.sample(b, tau=0.5, scale=5.0, mode="hard", generator=gen)
            loss = forward_kl(model(x, elastic=s.state), t) + router_loss(cost(s.probs), budget, cost.full)
            (loss / len(BUDGETS)).backward()
        finish()

    with torch.no_grad():  # the budgets' architectures as fixed masks: no router in the reference
        states = [None] + [router.sample(b, tau=0.5, scale=5.0, mode="hard", generator=gen).state
                           for b in range(1, len(BUDGETS))]  # fmt: skip

    def reference():
        with torch.no_grad():
            t = teacher(x)
        for st in states:
            (forward_kl(model(x, elastic=st), t) / len(BUDGETS)).backward()
        finish()

    pairs = {"P1": (elastic_full, plain), "P2": (nested, reference)}
    times = {k: ([], []) for k in pairs}
    for i in range(a.warmup + a.repeats):
        for name, (f, g) in pairs.items():
            order = [(0, f), (1, g)] if i % 2 == 0 else [(1, g), (0, f)]
            for side, fn in order:
                t0 = time.perf_counter()
                fn()
                if i >= a.warmup:
                    times[name][side].append(time.perf_counter() - t0)
    print(f"elastic step costs on CPU ({torch.get_num_threads()} threads): preset {a.preset}, batch {a.batch} x seq "
          f"{a.seq_len}, budgets {BUDGETS}; median of {a.repeats}\n")  # fmt: skip
    labels = {"P1": ("elastic step, full budget", "plain training step", 1.03),
              "P2": ("nested step, 3 budgets", "teacher fwd + 3 student fwd/bwd", 1.05)}  # fmt: skip
    for name, (ts, tr) in times.items():
        a_ms, b_ms = 1000 * statistics.median(ts), 1000 * statistics.median(tr)
        la, lb, goal = labels[name]
        print(f"{name}: {la:<28} {a_ms:8.1f} ms   {lb:<34} {b_ms:8.1f} ms   ratio {a_ms / b_ms:.3f} (goal <= {goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
