"""The router: a small network mapping a target budget to an architecture of the elastic space.

Input: the one-hot of the budget index (budgets sorted descending, index 0 = the full model).
``Linear(budgets, hidden) -> LeakyReLU -> one Linear head per axis``: the heads together are the
second linear layer. A head gives logits over its axis's choices (heterogeneous FFN / attention /
Mamba axes: ``layers x choices``; ``hidden`` and ``depth`` are always global). Axes with a single
choice (or no layer to act on) get no head: their probability is constant one-hot.

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from megatron_elastic.elastic.search_space import LAYER_AXIS_KIND, ElasticSpace
from megatron_elastic.elastic.sampler import check_budgets
from megatron_elastic.elastic.space import AXES, Architecture, layer_axes
from megatron_elastic.model.elastic_state import ElasticState, LayerMask

MASK_MODES = ("hard", "soft")
TAU_SCHEDULES = ("exponential", "linear", "cosine")
_LAYER_MASK_FIELD = {"ffn": "ffn", "attn_heads": "attn_heads", "mamba_heads": "mamba_heads",
                     "mamba_head_dim": "mamba_head_dim"}  # fmt: skip


@dataclass
class RouterSample:
    """One draw of the router for one budget."""

    budget_index: int
    probs: dict[str, torch.Tensor]
    """Per axis, Gumbel-softmax probabilities over its choices ((choices,) or (layers, choices)):
    the inputs of :mod:`megatron_elastic.elastic.costs`."""
    indices: dict[str, int | list[int]]
    """Per axis, the argmax choice index (a list per layer for per-layer axes)."""
    architecture: Architecture
    """The argmax architecture."""
    state: ElasticState
    """Masks for ``model(tokens, elastic=state)``, differentiable with respect to the router."""


class Router(nn.Module):
    """Budget index -> per-axis logits over the choices of ``space`` (see the module docstring)."""

    def __init__(self, space: ElasticSpace, budgets: Sequence[float], hidden_size: int = 256,
                 negative_slope: float = 0.01):  # fmt: skip
        super().__init__()
        self.space = space
        self.budgets = check_budgets(budgets)
        self.num_budgets = len(self.budgets)
        self.searchable = [a for a in AXES if space.is_searchable(a)]
        self.input = nn.Linear(self.num_budgets, hidden_size)
        self.act = nn.LeakyReLU(negative_slope)
        self.heads = nn.ModuleDict({a: nn.Linear(hidden_size, math.prod(space.prob_shape(a))) for a in self.searchable})
        for head in self.heads.values():  # every budget starts from uniform choices
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def _device(self) -> torch.device:
        return self.input.weight.device

    def logits(self, budget_index: int) -> dict[str, torch.Tensor]:
        """Raw logits z per searchable axis, shaped like :meth:`ElasticSpace.prob_shape`."""
        if not 0 <= budget_index < self.num_budgets:
            raise ValueError(f"budget index {budget_index} is out of range; the router has {self.num_budgets} budgets")
        x = nn.functional.one_hot(torch.tensor(budget_index, device=self._device()), self.num_budgets)
        h = self.act(self.input(x.to(self.input.weight.dtype)))
        return {a: head(h).view(self.space.prob_shape(a)) for a, head in self.heads.items()}

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
        space = self.space
        indices = self._indices({a: p.detach() for a, p in probs.items()})
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

        hidden_axis = space.axes["hidden"]
        hidden = axis_mask("hidden", hidden_axis, probs["hidden"], indices["hidden"])
        p_depth, k_depth = probs["depth"], indices["depth"]
        keep_matrix = space.keep_matrix(p_depth.dtype, device)  # (depth choices, layers)
        droppable = keep_matrix.min(0).values < 1
        expected_keep = p_depth @ keep_matrix
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
            if not droppable[i]:
                mask.keep = 1.0
            elif mode == "soft":
                mask.keep = expected_keep[i]
            else:
                mask.keep = depth_ratio if arch.layers[i].keep else 0.0
            layers.append(mask)
        state = ElasticState(hidden=hidden if "hidden" in self.heads else None, layers=layers)
        return RouterSample(budget_index=budget_index, probs=probs, indices=indices, architecture=arch, state=state)


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

