"""Which architecture each budget gets: the router and the cost model meet here.

:class:`BudgetSelection` holds the space, the router, the cost and the budgets (with the router's
tolerance) and answers, per budget index: whether it is the parent itself (budget 1.0, never
routed), the resolved choice (the router's argmax when it meets the budget, else the most likely
feasible homogeneous choice), its architecture and cost fraction. It also warms the router up on
the cost loss alone, reports what the router prefers, and writes the many-in-one metadata.
:func:`check_budgets_reachable` checks a space and cost before any router exists.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from megatron_elastic.elastic import manyinone
from megatron_elastic.elastic.costs import Cost, one_hot, router_loss
from megatron_elastic.elastic.router import Router, scale_at, tau_at
from megatron_elastic.elastic.search_space import ElasticSpace
from megatron_elastic.elastic.space import Architecture, full_architecture
from megatron_elastic.errors import ConfigError


def budget_tag(b: float) -> str:
    """The metric suffix of a budget: ``b0.75``."""
    return f"b{b:.2f}"


def _homogeneous(space: ElasticSpace, axis: str, i: int) -> int | list[int]:
    return [i] * len(space.layer_indices(axis)) if space.is_per_layer(axis) else i


def check_budgets_reachable(space: ElasticSpace, cost: Cost, budgets: Sequence[float], *, tolerance: float) -> None:
    """Every budget must lie between the smallest and the largest architecture of the space."""
    smallest = {a: _homogeneous(space, a, len(space.choices(a)) - 1) for a in space.axes}
    low = float(cost(one_hot(space, smallest, torch.float64))) / cost.full
    for b in budgets:
        if b < low * (1 - tolerance):
            raise ConfigError(
                f"elastic.budgets: {b} is out of reach: the smallest architecture of the space costs {low:.3f} of the "
                f"parent ({cost.kind}); add smaller choices (e.g. to elastic.ffn / elastic.depth) or raise the budget"
            )


class BudgetSelection:
    """Each budget's architecture, decided from the router's logits and the cost model."""

    def __init__(self, space: ElasticSpace, router: Router, cost: Cost, budgets: Sequence[float], *,
                 tolerance: float):  # fmt: skip
        self.space, self.router, self.cost = space, router, cost
        self.budgets = list(budgets)
        self.tolerance = tolerance
        self.full_cost = float(cost.full)

    @property
    def device(self) -> torch.device:
        param = next(self.router.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def check_reachable(self) -> None:
        check_budgets_reachable(self.space, self.cost, self.budgets, tolerance=self.tolerance)

    # ------------------------------------------------------------------ one budget
    def is_full(self, budget_index: int) -> bool:
        """Budget 1.0 is the parent itself: never routed, never masked (as the paper's 12B)."""
        return self.budgets[budget_index] == 1.0

    def fraction(self, indices: dict) -> float:
        """Cost of an index choice (axis -> choice index, per layer where the space is), over the parent's."""
        return float(self.cost(one_hot(self.space, indices, device=self.device))) / self.full_cost

    @torch.no_grad()
    def choice_for(self, budget_index: int) -> dict:
        """The router's most likely choice *that meets the budget* (within the tolerance).

        The plain argmax usually does; when it does not (the task loss pulled it across the band's
        edge), the homogeneous choices of the space are scored by the router's log-probability and
        the most likely feasible one wins, so an extracted child always honours its budget."""
        argmax = self.router.argmax_indices(budget_index)
        target, tol = self.budgets[budget_index], self.tolerance
        if abs(self.fraction(argmax) / target - 1) <= tol:
            return argmax
        logits = self.router.logits(budget_index)
        logp = {a: torch.log_softmax(z, dim=-1) for a, z in logits.items()}
        axes = list(logp)
        best, best_score, closest, closest_gap = None, -float("inf"), argmax, float("inf")
        for combo in itertools.product(*(range(len(self.space.choices(a))) for a in axes)):
            indices = {a: _homogeneous(self.space, a, i) for a, i in zip(axes, combo)}
            gap = abs(self.fraction(indices) / target - 1)
            if gap < closest_gap:
                closest, closest_gap = indices, gap
            if gap <= tol:
                score = sum(float(logp[a][..., i].sum()) for a, i in zip(axes, combo))
                if score > best_score:
                    best, best_score = indices, score
        return best if best is not None else closest

    def architecture_for(self, budget_index: int) -> Architecture:
        if self.is_full(budget_index):
            return full_architecture(self.space.config)
        return self.space.architecture(self.choice_for(budget_index))

    @torch.no_grad()
    def argmax_cost_fraction(self, budget_index: int) -> float:
        """Cost of the budget's resolved architecture, as a fraction of the parent's."""
        if self.is_full(budget_index):
            return 1.0
        return self.fraction(self.choice_for(budget_index))

    # ------------------------------------------------------------------ all budgets
    def metadata(self, elastic) -> dict:
        """The many-in-one metadata (``elastic``: the run's elastic section)."""
        return manyinone.metadata(self.space, self.budgets, self.architecture_for,
                                  cost_fraction=self.argmax_cost_fraction, cfg=elastic)  # fmt: skip

    def warm_up(self, elastic, *, seed: int) -> dict[str, float]:
        """Fit the router to the budgets on the cost loss alone (cheap: no data, no model forward);
        returns the resolved cost fraction per budget tag ({} without warm-up steps).

        Deterministic (fixed noise seed), so a fresh run and its resumed continuation agree."""
        e = elastic
        steps = e.router_warmup_steps
        if steps == 0:
            return {}
        opt = torch.optim.Adam(self.router.parameters(), lr=e.router_warmup_lr)
        gen = torch.Generator().manual_seed(seed + 17)
        for s in range(steps):
            tau = tau_at(s, steps, start=e.tau_start, end=max(e.tau_end, 0.1), kind=e.tau_schedule)
            scale = scale_at(s, steps, start=e.scale_start, end=e.scale_end)
            loss = sum(router_loss(self.cost(self.router.sample(b, tau=tau, scale=scale, mode="soft", generator=gen).probs),
                                   budget, self.full_cost, tolerance=e.router_tolerance / 2)
                       for b, budget in enumerate(self.budgets) if not self.is_full(b))  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.router.zero_grad(set_to_none=True)
        return {budget_tag(b): self.argmax_cost_fraction(i) for i, b in enumerate(self.budgets)}

    @torch.no_grad()
    def router_metrics(self, tau: float, scale: float) -> dict[str, float]:
        """What the router prefers per routed budget, noise-free at this tau and scale:
        ``router/b0.50/ffn/192`` = probability of FFN size 192 (mean over layers in a heterogeneous
        space), ``arch/b0.50/ffn`` = the argmax size, ``arch/b0.50/layers`` = layers kept and
        ``arch/b0.50/cost`` = the argmax architecture's cost / the parent's."""
        out: dict[str, float] = {}
        for b_idx, budget in enumerate(self.budgets):
            if self.is_full(b_idx):
                continue
            tag = budget_tag(budget)
            for axis, z in self.router.logits(b_idx).items():
                probs = torch.softmax(scale * z.float() / tau, dim=-1).reshape(-1, z.shape[-1]).mean(0)
                for size, p in zip(self.space.choices(axis), probs.tolist()):
                    out[f"router/{tag}/{axis}/{size}"] = p
            indices = self.router.argmax_indices(b_idx)
            for axis in self.router.heads:
                picked = [self.space.choices(axis)[i] for i in (indices[axis] if self.space.is_per_layer(axis)
                                                                 else [indices[axis]])]  # fmt: skip
                out[f"arch/{tag}/{axis if axis != 'depth' else 'layers'}"] = sum(picked) / len(picked)
            out[f"arch/{tag}/cost"] = self.fraction(indices)
        return out
