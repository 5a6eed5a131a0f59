"""Differentiable costs of the *expected* architecture, and the router loss.

The router gives, per axis, probabilities over that axis's choices (homogeneous: ``(choices,)``;
heterogeneous FFN / attention / Mamba axes: ``(layers of that type, choices)``; ``hidden`` and
``depth`` are always global). The expected size of an axis is ``probs @ choices`` and the expected
kept-fraction of layer ``i`` is ``probs_depth @ keep_matrix[:, i]``; these are plugged into the
closed-form cost, so the cost is exact for one-hot probabilities (an actual architecture) and
smooth in between. Costs are computed in float64 so that parameter counts of large parents stay
exact integers.

* :func:`params` — the formula of :func:`megatron_elastic.model.config.num_parameters`;
  ``active=True``: of :func:`megatron_elastic.model.config.active_parameters` (MoE layers count their
  top-k experts only, the top-k following the expected expert count as the architecture's does).
* :func:`memory` — weights + attention KV cache + Mamba conv / SSM state, in bytes.
* :func:`latency` — from a per-layer latency table measured by :func:`profile_latency`.
* :func:`router_loss` — ``relu(|cost / (budget * full) - 1| - tolerance)``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_elastic.elastic.search_space import LAYER_AXIS_KIND, ElasticSpace
from megatron_elastic.elastic.space import AXES
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig

Probs = Mapping[str, torch.Tensor]


@dataclass
class ExpectedArchitecture:
    """Expected sizes (float64 tensors). Per-type vectors hold one entry per layer of that type, in
    pattern order (homogeneous spaces repeat the one expected size)."""

    hidden: torch.Tensor
    """() expected hidden size."""
    keep: torch.Tensor
    """(num_layers,) probability that each layer is kept."""
    ffn: torch.Tensor
    """(MLP layers,) expected FFN size."""
    attn_heads: torch.Tensor
    """(attention layers,) expected query heads."""
    mamba_heads: torch.Tensor
    """(Mamba layers,) expected Mamba heads."""
    mamba_head_dim: torch.Tensor
    """(Mamba layers,) expected Mamba head_dim."""
    moe_experts: torch.Tensor
    """(MoE layers,) expected routed experts."""
    moe_ffn: torch.Tensor
    """(MoE layers,) expected FFN width of the routed experts."""
    moe_shared_ffn: torch.Tensor
    """(MoE layers,) expected shared-expert width."""


def one_hot(space: ElasticSpace, indices: Mapping[str, int | Sequence[int]], dtype=torch.float32,
            device=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Probabilities of a concrete choice (same index conventions as :meth:`ElasticSpace.architecture`)."""
    out = {}
    for axis in AXES:
        shape = space.prob_shape(axis)
        value = indices.get(axis, 0)
        idx = torch.as_tensor(value, device=device).expand(shape[:-1]) if len(shape) == 2 else torch.as_tensor(value)
        out[axis] = torch.nn.functional.one_hot(idx.long(), shape[-1]).to(dtype=dtype, device=device)
    return out


def expected_architecture(space: ElasticSpace, probs: Probs) -> ExpectedArchitecture:
    """Expected sizes under ``probs`` (a missing axis means its largest choice)."""
    device = next(iter(probs.values())).device if probs else None
    f64 = dict(dtype=torch.float64, device=device)
    sizes = {}
    for axis in AXES:
        shape = space.prob_shape(axis)
        p = probs.get(axis)
        if p is None:
            p = torch.zeros(shape, **f64)
            p[..., 0] = 1
        if tuple(p.shape) != shape:
            raise ValueError(f"probabilities of {axis} have shape {tuple(p.shape)}; the space expects {shape}")
        p = p.to(**f64)
        if axis == "depth":
            sizes[axis] = p @ space.keep_matrix(**f64)  # (num_layers,)
            continue
        e = p @ torch.tensor(space.choices(axis), **f64)
        if axis in LAYER_AXIS_KIND and e.dim() == 0:
            e = e.expand(len(space.layer_indices(axis)))
        sizes[axis] = e
    return ExpectedArchitecture(keep=sizes.pop("depth"), **sizes)


def _kept(space: ElasticSpace, e: ExpectedArchitecture, kind: str) -> torch.Tensor:
    return e.keep[[i for i, k in enumerate(space.config.layer_types) if k == kind]]


def params(space: ElasticSpace, probs: Probs, *, active: bool = False) -> torch.Tensor:
    """Expected parameter count: exactly ``sum(num_parameters(child_config(...)).values())`` (``active``:
    ``active_parameters(child_config(...))``) when the probabilities are one-hot."""
    c = space.config
    e = expected_architecture(space, probs)
    d = e.hidden
    total = c.vocab_size * d + d + (0 if c.tie_embeddings else c.vocab_size * d)  # embedding, final norm, output
    f = e.ffn
    mlp = d + 2 * d * f + ((f + d) if c.mlp_bias else 0)
    q = e.attn_heads * c.head_dim
    kv = c.num_query_groups * c.head_dim
    attn = d + d * (q + 2 * kv) + q * d
    H, di, gn = e.mamba_heads, e.mamba_heads * e.mamba_head_dim, c.mamba_num_groups * c.mamba_state_dim
    in_dim = 2 * di + 2 * gn + H  # in_proj -> [z, x, B, C, dt]
    conv = di + 2 * gn  # conv1d over [x, B, C]
    mamba = (d + d * in_dim + (in_dim if c.mamba_proj_bias else 0) + conv * c.mamba_conv_kernel
             + (conv if c.mamba_conv_bias else 0) + 3 * H + di + di * d + (d if c.mamba_proj_bias else 0))  # fmt: skip
    E = e.moe_experts
    din = c.moe_latent_size if c.moe_latent_size else d  # what the routed experts read and write
    routed = E
    if active:  # the top-k follows the kept experts where fewer than the parent's top-k are reachable
        reachable = c.moe_router_group_topk * E / max(1, c.moe_router_num_groups)
        routed = torch.minimum(reachable, torch.full_like(E, float(c.moe_router_topk)))
    s, L = e.moe_shared_ffn, c.moe_latent_size
    moe = (d + E * d + routed * 2 * din * e.moe_ffn + 2 * d * s + ((s + d) if c.mlp_bias else 0)
           + ((2 * d * L + ((L + d) if c.mlp_bias else 0)) if L else 0))  # fmt: skip
    for kind, per_layer in ((MLP, mlp), (ATTENTION, attn), (MAMBA, mamba), (MOE, moe)):
        total = total + (_kept(space, e, kind) * per_layer).sum()
    return total


def memory(space: ElasticSpace, probs: Probs, *, bytes_per_param: float = 2, batch: int = 1, context: int = 8192,
           state_bytes: float | None = None) -> torch.Tensor:  # fmt: skip
    """Expected inference memory in bytes at ``batch`` sequences of ``context`` tokens:

    weights ``params * bytes_per_param`` + per kept attention layer the KV cache
    ``2 * kv_heads * head_dim * context * batch`` + per kept Mamba layer the conv state
    ``(d_inner + 2*G*N) * (kernel - 1)`` and the SSM state ``H * P * N``, times ``batch``. Cache and
    state elements take ``state_bytes`` each (default ``bytes_per_param``). KV heads are never
    trimmed, so the KV cache only shrinks with depth.
    """
    c = space.config
    state_bytes = bytes_per_param if state_bytes is None else state_bytes
    e = expected_architecture(space, probs)
    kv_cache = 2 * c.num_query_groups * c.head_dim * context * batch
    di = e.mamba_heads * e.mamba_head_dim
    conv_state = (di + 2 * c.mamba_num_groups * c.mamba_state_dim) * (c.mamba_conv_kernel - 1)
    ssm_state = di * c.mamba_state_dim
    attention_cache = (_kept(space, e, ATTENTION) * kv_cache).sum()
    mamba_state = (_kept(space, e, MAMBA) * (conv_state + ssm_state)).sum() * batch
    cache = attention_cache + mamba_state
    return params(space, probs) * bytes_per_param + cache * state_bytes


# ---------------------------------------------------------------------- latency
# A latency table (JSON-safe; size keys may be strings):
#   {"hidden_size": 5120,                      # hidden size the layers were timed at
#    "M": {d_inner: seconds, ...},             # one Mamba layer (its pre-norm included) by H * P
#    "*": {query_heads: seconds, ...},         # one attention layer by query heads
#    "-": {ffn_hidden_size: seconds, ...},     # one MLP layer by FFN size
#    "output": {hidden_size: seconds, ...}}    # optional: final norm + output layer by hidden size
# Layer times are interpolated linearly in the size, extrapolated linearly above the largest
# point and proportionally (towards zero) below the smallest, so a time never turns negative;
# they are scaled by hidden / table["hidden_size"], since every projection is linear in the
# hidden size.
LATENCY_KINDS = (MAMBA, ATTENTION, MLP)


def _interp(x: torch.Tensor, points: Mapping) -> torch.Tensor:
    items = sorted((float(k), float(v)) for k, v in points.items())
    xs = torch.tensor([k for k, _ in items], dtype=x.dtype, device=x.device)
    ys = torch.tensor([v for _, v in items], dtype=x.dtype, device=x.device)
    proportional = ys[0] * x / xs[0]
    if len(items) == 1:
        return proportional
    j = torch.searchsorted(xs, x.detach().contiguous()).clamp(1, len(items) - 1)
    linear = ys[j - 1] + (x - xs[j - 1]) * (ys[j] - ys[j - 1]) / (xs[j] - xs[j - 1])
    return torch.where(x < xs[0], proportional, linear)


def check_latency_table(space: ElasticSpace, table: Mapping) -> None:
    """Raise ConfigError unless ``table`` has a non-empty entry for every layer type of the parent."""
    if not isinstance(table, Mapping) or "hidden_size" not in table:
        raise ConfigError("latency table lacks 'hidden_size'; regenerate it with profile_latency")
    if MOE in space.config.layer_types:
        raise ConfigError("the latency cost does not cover mixture-of-experts ('E') layers yet; use elastic.cost "
                          "params or active_params")  # fmt: skip
    for kind in set(space.config.layer_types):
        points = table.get(kind)
        if not isinstance(points, Mapping) or not points:
            raise ConfigError(f"latency table has no timings for layer type {kind!r}; regenerate it for this parent")


def latency(space: ElasticSpace, probs: Probs, table: Mapping) -> torch.Tensor:
    """Expected latency in seconds from ``table`` (format above)."""
    check_latency_table(space, table)
    e = expected_architecture(space, probs)
    scale = e.hidden / float(table["hidden_size"])
    widths = {MAMBA: e.mamba_heads * e.mamba_head_dim, ATTENTION: e.attn_heads, MLP: e.ffn}
    total = _interp(e.hidden.reshape(1), table["output"])[0] if table.get("output") else e.hidden * 0
    for kind, width in widths.items():
        if width.numel():
            total = total + (_kept(space, e, kind) * _interp(width, table[kind]) * scale).sum()
    return total


@torch.no_grad()
def profile_latency(config: HybridConfig, device: torch.device | str | None = None, seq_len: int = 128,
                    batch: int = 1, *, space: ElasticSpace | None = None, repeats: int = 5,
                    dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """Measure a latency table for ``config`` on ``device``: the forward time of one layer of each
    type at each width of ``space`` (default: widths 1, 3/4, 1/2, 1/4 of the parent, rounded to the
    groups), median of ``repeats`` runs after one warm-up, on random inputs of (batch, seq_len)."""
    from megatron_elastic.model.hybrid import REFERENCE_MIXERS, HybridBlock

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if space is None:
        fr = [1.0, 0.75, 0.5, 0.25]
        space = ElasticSpace(config, hidden=fr, ffn=fr, attn_heads=fr, mamba_heads=fr, mamba_head_dim=fr)
    c = space.config

    def timed(fn) -> float:
        fn()
        runs = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    x = torch.randn(batch, seq_len, c.hidden_size, device=device, dtype=dtype)

    def layer_time(kind: str, **sizes) -> float:
        cfg = dataclasses.replace(c, pattern=kind, **sizes)
        block = HybridBlock(cfg, 0, REFERENCE_MIXERS).to(device=device, dtype=dtype).eval()
        return timed(lambda: block(x))

    table: dict = {"hidden_size": c.hidden_size, "device": str(device), "seq_len": seq_len, "batch": batch}
    kinds = set(c.layer_types)
    if MLP in kinds:
        table[MLP] = {f: layer_time(MLP, ffn_hidden_size=f) for f in space.choices("ffn")}
    if ATTENTION in kinds:
        table[ATTENTION] = {h: layer_time(ATTENTION, num_attention_heads=h) for h in space.choices("attn_heads")}
    if MAMBA in kinds:
        shapes = {h * c.mamba_head_dim: (h, c.mamba_head_dim) for h in space.choices("mamba_heads")}
        shapes |= {c.mamba_num_heads * p: (c.mamba_num_heads, p) for p in space.choices("mamba_head_dim")}
        table[MAMBA] = {w: layer_time(MAMBA, mamba_num_heads=h, mamba_head_dim=p)
                        for w, (h, p) in sorted(shapes.items())}  # fmt: skip

    def output_time(d: int) -> float:  # final norm + output layer at hidden size d
        h, norm_w = x[..., :d], torch.ones(d, device=device, dtype=dtype)
        out_w = torch.randn(c.vocab_size, d, device=device, dtype=dtype)
        return timed(lambda: F.linear(F.rms_norm(h, (d,), norm_w), out_w))

    table["output"] = {d: output_time(d) for d in space.choices("hidden")}
    return table


# ---------------------------------------------------------------------- the router loss
def router_loss(cost: torch.Tensor, budget_fraction: float, full_cost: float | torch.Tensor,
                tolerance: float = 0.05) -> torch.Tensor:  # fmt: skip
    """``relu(|cost / (budget_fraction * full_cost) - 1| - tolerance)``: zero while the cost is within
    ``tolerance`` (relative) of the budget, then growing linearly, so the loss stays continuous at
    the band's edge and never pushes an architecture that already meets its budget."""
    return torch.relu((cost / (budget_fraction * full_cost) - 1).abs() - tolerance)


COST_KINDS = ("params", "active_params", "memory", "latency")


class Cost:
    """One cost kind bound to a space and its settings: ``cost(probs)`` and ``cost.full`` (the parent's)."""

    def __init__(self, space: ElasticSpace, kind: str = "params", *, bytes_per_param: float = 2, batch: int = 1,
                 context: int = 8192, table: Mapping | None = None):  # fmt: skip
        if kind not in COST_KINDS:
            raise ConfigError(f"cost {kind!r} is unknown; use one of {', '.join(COST_KINDS)}")
        if kind == "latency":
            if table is None:
                raise ConfigError("the latency cost needs a latency table (measure one with profile_latency)")
            check_latency_table(space, table)
        self.space, self.kind = space, kind
        fns: dict[str, Callable[[Probs], torch.Tensor]] = {
            "params": lambda p: params(space, p),
            "active_params": lambda p: params(space, p, active=True),
            "memory": lambda p: memory(space, p, bytes_per_param=bytes_per_param, batch=batch, context=context),
            "latency": lambda p: latency(space, p, table),
        }
        self._fn = fns[kind]
        self.full = float(self._fn(one_hot(space, space.full_indices(), torch.float64)))

    @classmethod
    def from_config(cls, elastic, space: ElasticSpace) -> Cost:
        """The cost a run's ``elastic`` section names (``cost``, its memory settings, ``latency_table``)."""
        e = elastic
        table = json.loads(Path(e.latency_table).read_text()) if e.latency_table else None
        return cls(space, e.cost, bytes_per_param=e.memory_bytes_per_param, batch=e.memory_batch,
                   context=e.memory_context, table=table)  # fmt: skip

    def __call__(self, probs: Probs) -> torch.Tensor:
        return self._fn(probs)

    def fraction(self, probs: Probs) -> torch.Tensor:
        """Cost relative to the parent's."""
        return self._fn(probs) / self.full

    def loss(self, probs: Probs, budget_fraction: float, tolerance: float = 0.05) -> torch.Tensor:
        return router_loss(self._fn(probs), budget_fraction, self.full, tolerance)
