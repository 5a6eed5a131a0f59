"""The nested-distillation step, written once for every trainer.

Per micro-batch the budget sampler picks the budgets to train (keyed by the *global* micro-batch
index ``micro * dp + dp_rank``, so a data-parallel run draws what one process draws for the same
samples); the frozen teacher runs **once**; then every picked budget is routed (budget 1.0 is the
parent itself: no masks, no routing; otherwise a Gumbel-softmax router sample whose noise depends
only on (seed, step, global micro-batch, budget)) and scored by

    loss = kd_weight * KD(student, teacher) + ce_weight * CE(student, labels) + router_loss_weight * router_loss

:class:`NestedStep` supplies these pieces; a trainer only executes them (a loop over micro-batches
and budgets, or megatron-core's pipeline schedule over the same items) and may free a micro-batch's
teacher logits once its budgets are done. The KD and CE functions are injected: the dense ones of
:mod:`distill.losses` by default, vocab-parallel ones under tensor parallelism.

Metrics use a fixed key set (``loss``, ``kd_loss/bX.XX``, ``ce/bX.XX``, ``cost/bX.XX``,
``router_loss/bX.XX``) as sums and counts (:class:`Tally`), so data-parallel ranks can all-reduce
them before the means (:func:`means`) are taken over the keys that were seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_elastic.distill.losses import cross_entropy, forward_kl
from megatron_elastic.elastic.costs import router_loss
from megatron_elastic.elastic.router import scale_at, tau_at
from megatron_elastic.elastic.sampler import BudgetSampler
from megatron_elastic.elastic.selection import BudgetSelection, budget_tag
from megatron_elastic.model.elastic_state import ElasticState

# (student logits, teacher logits) -> mean KD; (logits, labels) -> mean next-token cross-entropy.
KDLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CELoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PER_BUDGET_METRICS = ("kd_loss", "ce", "cost", "router_loss")


def metric_keys(budgets: Sequence[float]) -> list[str]:
    """The fixed metric keys of a step: ``loss`` then every per-budget metric of every budget."""
    return ["loss"] + [f"{m}/{budget_tag(b)}" for b in budgets for m in PER_BUDGET_METRICS]


def means(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """Per-key means over the keys that were seen at least once."""
    return {k: sums[k] / counts[k] for k in sums if counts[k] > 0}


class Tally:
    """Sums and counts over the fixed key set of :func:`metric_keys`."""

    def __init__(self, budgets: Sequence[float]):
        keys = metric_keys(budgets)
        self.sums: dict[str, float] = dict.fromkeys(keys, 0.0)
        self.counts: dict[str, float] = dict.fromkeys(keys, 0.0)

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] += float(value.detach())
        self.counts[key] += 1


class NestedStep:
    """Sampling, routing, the objective and the per-step scalars of one nested-distillation step."""

    def __init__(self, selection: BudgetSelection, sampler: BudgetSampler, *, elastic, distill, seed: int,
                 max_steps: int, kd: KDLoss | None = None, ce: CELoss | None = None):  # fmt: skip
        self.selection, self.sampler = selection, sampler
        self.elastic, self.distill = elastic, distill
        self.seed, self.max_steps = seed, max_steps
        d = distill
        self.kd = kd if kd is not None else (lambda s, t: forward_kl(s, t, temperature=d.temperature, top_k=d.top_k))
        self.ce = ce if ce is not None else cross_entropy

    @property
    def budgets(self) -> list[float]:
        return self.selection.budgets

    def tally(self) -> Tally:
        return Tally(self.budgets)

    def schedules(self, step: int) -> tuple[float, float]:
        """The router's Gumbel temperature and logit scale at ``step``."""
        e = self.elastic
        tau = tau_at(step, self.max_steps, start=e.tau_start, end=e.tau_end, kind=e.tau_schedule)
        return tau, scale_at(step, self.max_steps, start=e.scale_start, end=e.scale_end)

    def budgets_of(self, step: int, global_micro: int, tokens_seen: int) -> list[int]:
        """Budget indices to train on one micro-batch."""
        return self.sampler.sample(step, global_micro, tokens_seen)

    def noise(self, step: int, global_micro: int, budget_index: int) -> torch.Generator:
        # Gumbel noise depends only on (seed, step, micro-batch, budget): identical after a resume
        # and on every rank of one model replica.
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + step * 1009 + global_micro * 31 + budget_index) % (2**63))
        return g

    def route(self, step: int, global_micro: int, budget_index: int, tau: float,
              scale: float) -> tuple[ElasticState | None, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(masks, cost, router loss) of one budget on one micro-batch; the full budget is unmasked."""
        sel = self.selection
        if sel.is_full(budget_index):
            return None, torch.tensor(sel.full_cost), torch.zeros(())
        sample = sel.router.sample(budget_index, tau=tau, scale=scale, mode=self.elastic.mask_mode,
                                   generator=self.noise(step, global_micro, budget_index))  # fmt: skip
        cost = sel.cost(sample.probs)
        rl = router_loss(cost, self.budgets[budget_index], sel.full_cost, tolerance=self.elastic.router_tolerance)
        return sample.state, cost, rl

    def objective(self, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, budget_index: int,
                  cost: torch.Tensor, rl: torch.Tensor, tally: Tally) -> torch.Tensor:  # fmt: skip
        """KD + CE + router loss of one (micro-batch, budget) item, recorded into ``tally``."""
        d = self.distill
        kd = self.kd(logits, teacher_logits)
        ce = self.ce(logits, labels)
        loss = d.kd_weight * kd + d.ce_weight * ce + self.elastic.router_loss_weight * rl
        tag = budget_tag(self.budgets[budget_index])
        for key, value in ((f"kd_loss/{tag}", kd), (f"ce/{tag}", ce), (f"cost/{tag}", cost / self.selection.full_cost),
                           (f"router_loss/{tag}", rl), ("loss", loss)):  # fmt: skip
            tally.add(key, value)
        return loss

    def metrics(self, step_means: dict[str, float], *, lr: float, grad_norm: float, tau: float,
                scale: float) -> dict[str, float]:  # fmt: skip
        """The step's metrics: the loss, the per-step scalars, then the per-budget means."""
        out = {"loss": step_means.get("loss", float("nan")), "lr": lr, "grad_norm": grad_norm, "tau": tau,
               "scale": scale}  # fmt: skip
        out.update({k: v for k, v in step_means.items() if k != "loss"})
        return out
