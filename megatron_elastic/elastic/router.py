"""The router: a small network mapping a target budget to an architecture of the elastic space.

Input: the one-hot of the budget index (budgets sorted descending, index 0 = the full model).
Every searchable axis has its own two-layer network, ``Linear(budgets, hidden) -> LeakyReLU ->
Linear(hidden, choices)`` (heterogeneous FFN / attention / Mamba axes: ``layers x choices``
outputs; ``hidden`` and ``depth`` are always global). Axes with a single choice (or no layer to
act on) get no network: their probability is constant one-hot.

Logits are bounded: ``z = logit_bound * cos(h, w_j)``, the cosine between the hidden vector and
row ``j`` of the second layer. Plain linear logits (``logit_bound=None``) grow with every Adam
step, faster the higher the router's learning rate (100x the model's); once they are large the
softmax saturates, the cost gradient vanishes and whatever choice the router holds, in budget or
not, freezes before the schedule meant it to. With bounded logits the annealed ``scale / tau``
alone decides how peaked the distribution gets. Weights start N(0, ``init_std``), so the initial
choice is a random, not uniform, preference.

Sampling is Gumbel-softmax, ``p = softmax((scale * z + g) / tau)`` with ``g`` Gumbel noise from the
caller's ``torch.Generator`` (so a seed reproduces a sample on every rank); ``tau`` anneals
(:func:`tau_at`) and ``scale`` rises (:func:`scale_at`) over training. Two mask modes:

* ``hard``: the prefix mask of the argmax choice, multiplied by ``p_k / p_k.detach()`` (k = the
  argmax). The forward value is exactly the hard mask, so the trained function is the one that
  extraction cuts out; the backward pass still reaches the router through ``p_k``. Multiplying by
  ``p_k`` itself would also pass gradients, but would scale every kept channel by ``p_k < 1`` and
  train a function no extracted child computes.
* ``soft``: the probability-weighted sum of the candidate prefix masks (:meth:`Axis.soft_mask`),
  values in [0, 1], non-increasing along each prefix.

Depth: hard mode drops the layers of the argmax depth choice. A dropped layer gets the python
float ``keep=0.0``, so the model skips it (identity, not computed) and passes no task-loss
gradient: which layers to drop is learnt through the cost, plus the gradient of the kept layers,
whose ``keep = p_k / p_k.detach()`` (forward 1.0). Soft mode gives every droppable layer its
probability of being kept. Layers that no depth choice drops keep the float 1.0.

Router parameters are their own optimiser group (:func:`router_param_group`) with a learning rate
about 100x the model's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_elastic.elastic.sampler import check_budgets
from megatron_elastic.elastic.search_space import LAYER_AXIS_KIND, ElasticSpace
from megatron_elastic.elastic.space import AXES, Architecture, layer_axes
from megatron_elastic.model.config import MOE
from megatron_elastic.model.elastic_state import ElasticState, LayerMask

MASK_MODES = ("hard", "soft")
TAU_SCHEDULES = ("exponential", "linear", "cosine")
_LAYER_MASK_FIELD = {axis: axis for axis in LAYER_AXIS_KIND}  # the LayerMask field of each per-layer axis


class RouterSample:
    """One draw of the router for one budget.

    ``probs`` and ``indices`` are computed at once; ``architecture`` and ``state`` on first access
    (a cost-only step, such as a router warm-up, never builds masks)."""

    def __init__(self, budget_index: int, probs: dict[str, torch.Tensor], indices: dict[str, int | list[int]],
                 build: Callable[[], tuple[Architecture, ElasticState]]):  # fmt: skip
        self.budget_index = budget_index
        self.probs = probs
        """Per axis, Gumbel-softmax probabilities over its choices ((choices,) or (layers, choices)):
        the inputs of :mod:`megatron_elastic.elastic.costs`."""
        self.indices = indices
        """Per axis, the argmax choice index (a list per layer for per-layer axes)."""
        self._build = build
        self._built: tuple[Architecture, ElasticState] | None = None

    def _get(self) -> tuple[Architecture, ElasticState]:
        if self._built is None:
            self._built = self._build()
        return self._built

    @property
    def architecture(self) -> Architecture:
        """The argmax architecture."""
        return self._get()[0]

    @property
    def state(self) -> ElasticState:
        """Masks for ``model(tokens, elastic=state)``, differentiable with respect to the router."""
        return self._get()[1]


class AxisHead(nn.Module):
    """One axis's network: budget one-hot -> Linear -> LeakyReLU -> Linear -> (bounded) logits."""

    def __init__(self, num_budgets: int, hidden_size: int, num_outputs: int, *, negative_slope: float,
                 logit_bound: float | None, init_std: float):  # fmt: skip
        super().__init__()
        self.fc1 = nn.Linear(num_budgets, hidden_size, bias=False)
        self.act = nn.LeakyReLU(negative_slope)
        self.fc2 = nn.Linear(hidden_size, num_outputs, bias=False)
        self.logit_bound = logit_bound
        nn.init.normal_(self.fc1.weight, std=init_std)
        nn.init.normal_(self.fc2.weight, std=init_std)

    def forward(self, budget_one_hot: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(budget_one_hot))
        if self.logit_bound is None:
            return self.fc2(h)
        return self.logit_bound * F.linear(F.normalize(h, dim=-1), F.normalize(self.fc2.weight, dim=-1))


class Router(nn.Module):
    """Budget index -> per-axis logits over the choices of ``space`` (see the module docstring)."""

    def __init__(self, space: ElasticSpace, budgets: Sequence[float], hidden_size: int = 256, *,
                 negative_slope: float = 0.1, logit_bound: float | None = 2.0, init_std: float = 0.1):  # fmt: skip
        super().__init__()
        if logit_bound is not None and not logit_bound > 0:
            raise ValueError(f"logit_bound={logit_bound!r} must be > 0 (or None for unbounded logits)")
        self.space = space
        self.budgets = check_budgets(budgets)
        self.num_budgets = len(self.budgets)
        self.heads = nn.ModuleDict({
            a: AxisHead(self.num_budgets, hidden_size, math.prod(space.prob_shape(a)), negative_slope=negative_slope,
                        logit_bound=logit_bound, init_std=init_std)
            for a in AXES if space.is_searchable(a)
        })  # fmt: skip

    def _device(self) -> torch.device:
        return next(self.parameters()).device if self.heads else torch.device("cpu")

    def logits(self, budget_index: int) -> dict[str, torch.Tensor]:
        """Logits z per searchable axis, shaped like :meth:`ElasticSpace.prob_shape`."""
        if isinstance(budget_index, bool) or not 0 <= budget_index < self.num_budgets:
            raise ValueError(f"budget index {budget_index} is out of range; the router has {self.num_budgets} budgets")
        x = F.one_hot(torch.tensor(budget_index, device=self._device()), self.num_budgets).float()
        return {a: head(x.to(head.fc1.weight.dtype)).view(self.space.prob_shape(a)) for a, head in self.heads.items()}

    def _fixed(self, axis: str) -> torch.Tensor:
        p = torch.zeros(self.space.prob_shape(axis), device=self._device())
        p[..., 0] = 1
        return p

    def sample(self, budget_index: int, *, tau: float, scale: float, mode: str = "hard",
               generator: torch.Generator | None = None) -> RouterSample:  # fmt: skip
        """A Gumbel-softmax draw for ``budget_index`` and the masks of ``mode`` ('hard' or 'soft')."""
        if mode not in MASK_MODES:
            raise ValueError(f"mask mode {mode!r} is unknown; use 'hard' or 'soft'")
        if not tau > 0:
            raise ValueError(f"tau={tau!r} must be > 0")
        logits = self.logits(budget_index)
        probs = {}
        for axis in AXES:
            if axis not in logits:
                probs[axis] = self._fixed(axis)
                continue
            z = logits[axis]
            # Noise is drawn on the CPU from the caller's generator: identical on every device and rank.
            u = torch.rand(z.shape, generator=generator, dtype=torch.float64).clamp_(1e-20, 1 - 1e-12)
            g = (-torch.log(-torch.log(u))).to(device=z.device, dtype=z.dtype)
            probs[axis] = torch.softmax((scale * z + g) / tau, dim=-1)
        return self._result(budget_index, probs, mode)

    @torch.no_grad()
    def argmax_indices(self, budget_index: int) -> dict[str, int | list[int]]:
        """Noise-free argmax choice per axis (extraction)."""
        logits = self.logits(budget_index)
        return self._indices({a: logits.get(a, self._fixed(a)) for a in AXES})

    def argmax_architecture(self, budget_index: int) -> Architecture:
        """The architecture the router picks for ``budget_index`` without noise."""
        return self.space.architecture(self.argmax_indices(budget_index))

    def _indices(self, scores: dict[str, torch.Tensor]) -> dict[str, int | list[int]]:
        out: dict[str, int | list[int]] = {}
        for axis in AXES:
            idx = scores[axis].argmax(-1).tolist()
            out[axis] = idx if self.space.is_per_layer(axis) else int(idx)
        return out

    def _result(self, budget_index: int, probs: dict[str, torch.Tensor], mode: str) -> RouterSample:
        indices = self._indices({a: p.detach() for a, p in probs.items()})
        return RouterSample(budget_index, probs, indices, lambda: self._masks(probs, indices, mode))

    def _masks(self, probs: dict[str, torch.Tensor], indices: dict[str, int | list[int]],
               mode: str) -> tuple[Architecture, ElasticState]:  # fmt: skip
        space = self.space
        arch = space.architecture(indices)
        device = self._device()

        def axis_mask(axis: str, ax, p: torch.Tensor, k: int) -> torch.Tensor:
            """Mask of one axis instance from its probability row ``p`` and argmax index ``k``."""
            if mode == "soft":
                return ax.soft_mask(p, space.choices(axis))
            return ax.mask(space.choices(axis)[k], device, p.dtype) * (p[k] / p[k].detach())

        def row(axis: str, nth: int) -> tuple[torch.Tensor, int]:
            p, k = probs[axis], indices[axis]
            return (p[nth], k[nth]) if space.is_per_layer(axis) else (p, k)

        hidden = None
        if "hidden" in self.heads:
            hidden = axis_mask("hidden", space.axes["hidden"], probs["hidden"], indices["hidden"])
        p_depth, k_depth = probs["depth"], indices["depth"]
        droppable = set(space.dropped_layers(len(space.choices("depth")) - 1))  # the smallest choice drops most
        expected_keep = p_depth @ space.keep_matrix(p_depth.dtype, device)  # (layers,)
        depth_ratio = p_depth[k_depth] / p_depth[k_depth].detach()
        nth = {a: 0 for a in LAYER_AXIS_KIND}
        layers = []
        for i, kind in enumerate(space.config.layer_types):
            mask = LayerMask()
            axes_here = layer_axes(space.config, i)
            for axis, field in _LAYER_MASK_FIELD.items():
                if LAYER_AXIS_KIND[axis] != kind:
                    continue
                p, k = row(axis, nth[axis])
                nth[axis] += 1
                if axis in self.heads:
                    setattr(mask, field, axis_mask(axis, axes_here[axis], p, k))
            if kind == MOE and arch.layers[i].moe_router_topk != space.config.moe_router_topk:
                mask.moe_topk = arch.layers[i].moe_router_topk  # fewer experts kept than the top-k can reach
            if i not in droppable:
                mask.keep = 1.0
            elif mode == "soft":
                mask.keep = expected_keep[i]
            else:
                mask.keep = depth_ratio if arch.layers[i].keep else 0.0
            layers.append(mask)
        return arch, ElasticState(hidden=hidden, layers=layers)


def router_param_group(router: Router, model_lr: float, lr_multiplier: float = 100.0) -> dict:
    """The optimiser parameter group of the router: lr = ``lr_multiplier`` x the model's, no weight decay."""
    return {"params": list(router.parameters()), "lr": model_lr * lr_multiplier, "weight_decay": 0.0, "name": "router"}


def tau_at(step: int, total: int, start: float = 1.0, end: float = 0.05, kind: str = "exponential") -> float:
    """Gumbel-softmax temperature at ``step`` of ``total``: ``start`` at 0, ``end`` from ``total`` on.

    exponential: start * (end / start) ** t; linear: start + (end - start) * t; cosine: end + (start
    - end) * (1 + cos(pi t)) / 2, with t = step / total clipped to [0, 1].
    """
    if kind not in TAU_SCHEDULES:
        raise ValueError(f"tau schedule {kind!r} is unknown; use exponential, linear or cosine")
    t = min(max(step / total, 0.0), 1.0) if total > 0 else 1.0
    if kind == "exponential":
        return start * (end / start) ** t
    if kind == "linear":
        return start + (end - start) * t
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def scale_at(step: int, total: int, start: float = 1.0, end: float = 10.0) -> float:
    """Logit scale at ``step`` of ``total``, rising linearly from ``start`` to ``end``."""
    t = min(max(step / total, 0.0), 1.0) if total > 0 else 1.0
    return start + (end - start) * t
