"""Which budgets a micro-batch trains: the two-stage budget curriculum.

A draw depends only on ``(seed, step, micro_batch)`` and the stage, never on process state, so
every tensor / pipeline rank of one model replica draws the same budgets without communicating,
and a resumed run draws what the uninterrupted run would have.

Stage 1 (short context) samples budgets with ``stage1_weights`` (default uniform); stage 2 (long
context) with ``stage2_weights`` (default: the stage-1 weights), from ``switch_step`` or
``switch_tokens``, whichever comes first. With probability ``full_model_prob`` a draw is the full
model (index 0) regardless of the weights. Each of the ``budgets_per_micro_batch`` draws is
independent (a budget may repeat, which weights it more); 0 trains every budget, largest first
(the sandwich).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from megatron_elastic.config.schema import check_fractions
from megatron_elastic.errors import ConfigError


def check_budgets(budgets: Sequence[float]) -> list[float]:
    """Budgets as floats, or ConfigError unless they are fractions in (0, 1], unique, sorted largest
    first, the first 1.0 (the full model)."""
    return check_fractions("elastic.budgets", budgets, item="budget", full="the full model")

def _weights(name: str, weights: Sequence[float] | None, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != n:
        count = len(weights) if isinstance(weights, Sequence) else weights
        raise ConfigError(f"distill.{name} has {count!r} entries for {n} budgets; give one weight per budget")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"distill.{name}={list(weights)} is invalid; give non-negative weights with a positive sum")
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def _optional_count(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"distill.{name}={value!r} is invalid; give a non-negative integer (or leave it unset)")
    return int(value)


class BudgetSampler:
    """Budget indices (into ``budgets``, 0 = the full model) per micro-batch; see the module docstring."""

    def __init__(self, budgets: Sequence[float], *, stage1_weights: Sequence[float] | None = None,
                 stage2_weights: Sequence[float] | None = None, full_model_prob: float = 0.0,
                 switch_step: int | None = None, switch_tokens: int | None = None, budgets_per_micro_batch: int = 1,
                 seed: int = 0):  # fmt: skip
        self.budgets = check_budgets(budgets)
        n = len(self.budgets)
        self.stage1_weights = _weights("stage1_weights", stage1_weights, n)
        self.stage2_weights = (
            self.stage1_weights if stage2_weights is None else _weights("stage2_weights", stage2_weights, n)
        )
        p = full_model_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ConfigError(f"distill.full_model_prob={p!r} is not a probability; use a value in [0, 1]")
        self.full_model_prob = float(p)
        self.switch_step = _optional_count("stage2_start_step", switch_step)
        self.switch_tokens = _optional_count("stage2_start_tokens", switch_tokens)
        if stage2_weights is not None and self.switch_step is None and self.switch_tokens is None:
            warnings.warn("distill.stage2_weights is ignored: stage 2 never starts (set a switch step or token count)",
                          stacklevel=2)  # fmt: skip
        k = budgets_per_micro_batch
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(
                f"distill.budgets_per_micro_batch={k!r} is invalid; give a non-negative integer (0 = all budgets)"
            )
        self.budgets_per_micro_batch = k
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed={seed!r} is invalid; give a non-negative integer")
        self.seed = int(seed)

    def stage(self, step: int, tokens_seen: int = 0) -> int:
        """1 before the switch, 2 from ``switch_step`` or ``switch_tokens`` on (whichever comes first)."""
        if self.switch_step is not None and step >= self.switch_step:
            return 2
        if self.switch_tokens is not None and tokens_seen >= self.switch_tokens:
            return 2
        return 1

    def weights(self, stage: int) -> np.ndarray:
        """Normalised sampling weights of ``stage`` (before ``full_model_prob``)."""
        return self.stage1_weights if stage == 1 else self.stage2_weights

    def sample(self, step: int, micro_batch: int, tokens_seen: int = 0) -> list[int]:
        """Budget indices to train on micro-batch ``micro_batch`` of optimiser step ``step``."""
        if self.budgets_per_micro_batch == 0:
            return list(range(len(self.budgets)))
        rng = np.random.default_rng([self.seed, int(step), int(micro_batch)])
        w = self.weights(self.stage(step, tokens_seen))
        out = []
        for _ in range(self.budgets_per_micro_batch):
            # Always draw both numbers so that full_model_prob does not shift the later draws.
            full, pick = rng.random(), int(rng.choice(len(w), p=w))
            out.append(0 if full < self.full_model_prob else pick)
        return out
