"""Activation-based importance of every elastic axis, from forward passes over calibration batches.

Scores (all accumulated in float64 from the model's own forward pass, ``elastic=None``, eval mode):

==================  ==============================================================================
axis                score
==================  ==============================================================================
hidden channel i    sum over batch and tokens of ``|RMSNorm(X)_i|``, summed over every block's
                    pre-norm output and the final norm's output
FFN neuron i        sum over batch and tokens of ``|X W1_i|`` (``up_proj`` output, before the
                    squared ReLU; the bias, if any, included)
Mamba channel p     ``S[h, p]`` = sum over batch and tokens of ``|s_{h,p}|`` where ``s`` is the
                    x-part of ``in_proj``'s output viewed as (b, L, H, P); channel score =
                    ``||S[:, p]||_2`` (L2 over heads)
Mamba head h        ``||S[h, top]||_2`` over the ``top`` channels (the ``mamba_top_channels`` best
                    ones, default all ``P``); heads are ranked **within their B/C group**
attention head      ``A[c]`` = sum over batch and tokens of ``|q_c|`` (``q_proj`` output channel c);
                    head score = ``||A[head's channels]||_2``; ranked **within its KV group**
routed expert e     sum over the (token, slot) pairs routed to ``e`` of ``||w_te * expert_e(x_t)||_2``
                    (its weighted output): routing frequency x mean output magnitude, so an expert
                    that is picked often but contributes little, or rarely, ranks low; ranked
                    **within its routing group**
expert neuron i     sum over the routed (token, slot) pairs and every expert of ``|x W1_{e,i}|`` (the
                    experts' up_proj output; one order for all experts of a layer)
shared neuron i     sum over batch and tokens of ``|x W1_i|`` of the shared expert's up_proj
depth               see :data:`DEPTH_METHODS`
==================  ==============================================================================

Aggregation choice: every width score sums *absolute* activations over batch and tokens (signed
sums would let positive and negative activations of a busy channel cancel). Model-Optimizer's
Minitron pruning also uses ``|.|``; it averages over tokens and takes an L2 norm over the batch,
which differs from the plain sum here only in how samples are weighted. The per-head reductions
(L2 over channels, L2 over heads for a Mamba channel) follow Minitron.

Depth methods:

* ``iterative-mse`` (the paper's): with the set ``R`` of layers removed so far, every remaining
  layer ``j`` gets ``s_j = sum (logits_full - logits_{R+j})^2 / sum logits_full^2`` over all
  calibration tokens (layers skipped with ``LayerMask(keep=0.0)``); the argmin joins ``R``
  (ties: lowest index); repeated until every layer is ordered.
* ``block-influence`` (ShortGPT): ``1 - cos(x_in, x_out)`` of each block, averaged over tokens,
  one shot; the least influential layer is removed first.
* ``random``: a permutation drawn from ``torch.Generator().manual_seed(seed)``.

Orders are "most important first" on width axes (``order[k]`` = the parent index that moves to
position ``k``, see :mod:`megatron_elastic.elastic.permute`) and "least important first" on depth
(the removal order). Ties keep the lower index first (stable sorts), so results are deterministic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import ATTENTION, LAYER_NAMES, MAMBA, MLP, MOE, HybridConfig
from megatron_elastic.model.elastic_state import ElasticState, LayerMask
from megatron_elastic.model.layout import MambaLayout

DEPTH_METHODS = ("iterative-mse", "block-influence", "random")
FORMAT = "megatron-elastic-ranking"
FORMAT_VERSION = 1
_PER_LAYER_AXES = {"ffn": MLP, "attn_heads": ATTENTION, "mamba_heads": MAMBA, "mamba_head_dim": MAMBA,
                   "moe_experts": MOE, "moe_ffn": MOE, "moe_shared_ffn": MOE}  # fmt: skip
_MOE_RANKING_AXES = ("moe_experts", "moe_ffn", "moe_shared_ffn")  # absent from rankings of dense parents


# ---------------------------------------------------------------------- the ranking file
def find_ranking(model_dir: str | Path, explicit: str | Path | None, *, key: str) -> Path | None:
    """The ranking.json of ``model_dir``: ``explicit`` if given (it must exist; ``key`` names the setting
    in the message), else ranking.json inside or beside ``model_dir``, else None."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{key}={str(path)!r} does not exist; run `megatron-elastic importance` first")
        return path
    model_dir = Path(model_dir)
    return next((p for p in (model_dir / "ranking.json", model_dir.parent / "ranking.json") if p.is_file()), None)


def read_depth_order(path: str | Path) -> list[int]:
    """The depth removal order (least important first) of a ranking file, ``["depth"]["order"]``."""
    try:
        return [int(i) for i in json.loads(Path(path).read_text())["depth"]["order"]]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{str(path)!r} has no depth order (depth.order); regenerate it with "
                          "`megatron-elastic importance`") from None  # fmt: skip


# ---------------------------------------------------------------------- the ranking
@dataclass
class Ranking:
    """Per-axis importance orders of one parent (layer indices are the parent's pattern positions)."""

    hidden: list[int]
    """(hidden_size,) channels, most important first."""
    ffn: dict[int, list[int]]
    """MLP layer -> (ffn_hidden_size,) neurons, most important first."""
    attn_heads: dict[int, list[int]]
    """Attention layer -> (num_attention_heads,) query heads; position p holds a head of KV group
    ``p // (heads / kv_heads)``, most important first inside each group."""
    mamba_heads: dict[int, list[int]]
    """Mamba layer -> (mamba_num_heads,) heads; position p holds a head of B/C group
    ``p // (heads / groups)``, most important first inside each group."""
    mamba_head_dim: dict[int, list[int]]
    """Mamba layer -> (mamba_head_dim,) channels (the same for every head), most important first."""
    depth: list[int]
    """Every layer once, in removal order: least important first."""
    depth_method: str
    """One of :data:`DEPTH_METHODS`."""
    moe_experts: dict[int, list[int]] = field(default_factory=dict)
    """MoE layer -> (num_moe_experts,) routed experts; position p holds an expert of routing group
    ``p // (experts / groups)``, most important first inside each group."""
    moe_ffn: dict[int, list[int]] = field(default_factory=dict)
    """MoE layer -> (moe_ffn_hidden_size,) neurons of every routed expert, most important first."""
    moe_shared_ffn: dict[int, list[int]] = field(default_factory=dict)
    """MoE layer -> (moe_shared_expert_intermediate_size,) shared-expert neurons, most important first."""
    scores: dict = field(default_factory=dict)
    """Raw scores, indexed by the parent's original indices: ``hidden`` (d,), ``ffn`` /
    ``attn_heads`` / ``mamba_heads`` / ``mamba_head_dim`` {layer: list}, ``depth`` (aligned with
    :attr:`depth`: the score each layer had when it was removed), ``depth_steps`` (iterative-mse:
    one {layer: score} per step), ``block_influence`` (per layer)."""
    meta: dict = field(default_factory=dict)
    """Calibration facts (batches, tokens, ...), free-form and JSON-safe."""

    # ------------------------------------------------------------------ construction and checks
    @classmethod
    def identity(cls, config: HybridConfig, depth_method: str = "random") -> Ranking:
        """The ranking that keeps every index where it is (depth: layers in pattern order)."""
        per = {axis: {} for axis in _PER_LAYER_AXES}
        for i in range(config.num_layers):
            d = config.layer_dims(i)
            if d.kind == MLP:
                per["ffn"][i] = list(range(d.ffn_hidden_size))
            elif d.kind == ATTENTION:
                per["attn_heads"][i] = list(range(d.num_attention_heads))
            elif d.kind == MOE:
                per["moe_experts"][i] = list(range(d.num_moe_experts))
                per["moe_ffn"][i] = list(range(d.moe_ffn_hidden_size))
                per["moe_shared_ffn"][i] = list(range(d.moe_shared_expert_intermediate_size))
            else:
                per["mamba_heads"][i] = list(range(d.mamba_num_heads))
                per["mamba_head_dim"][i] = list(range(d.mamba_head_dim))
        return cls(hidden=list(range(config.hidden_size)), depth=list(range(config.num_layers)),
                   depth_method=depth_method, **per)  # fmt: skip

    def check(self, config: HybridConfig) -> None:
        """Raise ConfigError unless every order is a permutation of the right size for ``config``
        and every head stays inside its group."""
        _check_perm("hidden", self.hidden, config.hidden_size)
        _check_perm("depth", self.depth, config.num_layers)
        if self.depth_method not in DEPTH_METHODS:
            raise ConfigError(
                f"ranking depth_method {self.depth_method!r} is unknown; use one of {', '.join(DEPTH_METHODS)}"
            )
        for axis, kind in _PER_LAYER_AXES.items():
            orders = getattr(self, axis)
            expected = [i for i, t in enumerate(config.layer_types) if t == kind]
            if sorted(orders) != expected:
                raise ConfigError(
                    f"ranking {axis} covers layers {sorted(orders)} but the model's {LAYER_NAMES[kind]} layers are "
                    f"{expected}; the ranking was computed for another model"
                )
            for i in expected:
                d = config.layer_dims(i)
                where = f"{axis}[layer {i}]"
                if axis == "ffn":
                    _check_perm(where, orders[i], d.ffn_hidden_size)
                elif axis == "attn_heads":
                    _check_perm(where, orders[i], d.num_attention_heads, groups=config.num_query_groups)
                elif axis == "mamba_heads":
                    _check_perm(where, orders[i], d.mamba_num_heads, groups=config.mamba_num_groups)
                elif axis == "moe_experts":
                    _check_perm(where, orders[i], d.num_moe_experts, groups=config.moe_router_num_groups)
                elif axis == "moe_ffn":
                    _check_perm(where, orders[i], d.moe_ffn_hidden_size)
                elif axis == "moe_shared_ffn":
                    _check_perm(where, orders[i], d.moe_shared_expert_intermediate_size)
                else:
                    _check_perm(where, orders[i], d.mamba_head_dim)

    def layers_to_drop(self, count: int) -> list[int]:
        """The ``count`` least important layers (sorted), for ``homogeneous(..., drop_layers=...)``."""
        if not 0 <= count < len(self.depth):
            raise ConfigError(f"cannot drop {count} of {len(self.depth)} layers; keep at least one")
        return sorted(self.depth[:count])

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """A JSON-safe dict (layer keys as strings, non-finite scores as null); the depth removal
        order is at ``["depth"]["order"]`` and its method at ``["depth"]["method"]``."""
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, "hidden": list(map(int, self.hidden)),
               "depth": {"order": list(map(int, self.depth)), "method": self.depth_method}}  # fmt: skip
        for axis in _PER_LAYER_AXES:
            out[axis] = {str(i): list(map(int, order)) for i, order in sorted(getattr(self, axis).items())}
        out["scores"] = _jsonable(self.scores)
        out["meta"] = _jsonable(self.meta)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Ranking:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"not a ranking of this version (format {data.get('format')!r} v{data.get('format_version')!r}, "
                f"expected {FORMAT!r} v{FORMAT_VERSION}); recompute it with `megatron-elastic importance`"
            )
        try:
            per = {
                axis: {int(i): [int(v) for v in order]
                       for i, order in (data.get(axis, {}) if axis in _MOE_RANKING_AXES else data[axis]).items()}
                for axis in _PER_LAYER_AXES
            }  # fmt: skip
            scores = dict(data.get("scores") or {})
            for axis in _PER_LAYER_AXES:
                if axis in scores:
                    scores[axis] = {int(i): v for i, v in scores[axis].items()}
            if "depth_steps" in scores:
                scores["depth_steps"] = [{int(i): v for i, v in step.items()} for step in scores["depth_steps"]]
            return cls(hidden=[int(v) for v in data["hidden"]], depth=[int(v) for v in data["depth"]["order"]],
                       depth_method=str(data["depth"]["method"]), scores=scores, meta=dict(data.get("meta") or {}),
                       **per)  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"ranking is incomplete or malformed ({type(exc).__name__}: {exc}); recompute it"
            ) from None

    # ------------------------------------------------------------------ report
    def report(self, config: HybridConfig | None = None, *, top: int = 8) -> str:
        """A readable markdown summary: top/bottom channels, per-layer orders, the depth order."""
        types = config.layer_types if config is not None else None
        s = self.scores
        lines = ["# Importance ranking", ""]
        if config is not None:
            lines.append(f"Model: pattern `{''.join(config.layer_types)}` ({config.num_layers} layers), "
                         f"hidden {config.hidden_size}.")  # fmt: skip
        if self.meta:
            lines.append("Calibration: " + ", ".join(f"{k} {v}" for k, v in self.meta.items()) + ".")
        lines += ["", "Orders are most important first (width) and least important first (depth: the removal order).",
                  "Scores are sums of absolute activations over the calibration tokens.", ""]  # fmt: skip

        lines += [f"## Hidden channels ({len(self.hidden)})", ""]
        lines += _top_bottom(self.hidden, s.get("hidden"), top)
        lines.append("")

        layer_ids = sorted(set(self.ffn) | set(self.attn_heads) | set(self.mamba_heads) | set(self.moe_experts))
        lines += ["## Layers", ""]
        for i in layer_ids:
            kind = types[i] if types else (MLP if i in self.ffn else ATTENTION if i in self.attn_heads else
                                           MOE if i in self.moe_experts else MAMBA)  # fmt: skip
            lines.append(f"### Layer {i} ({LAYER_NAMES[kind]})")
            if i in self.ffn:
                lines.append(f"FFN neurons ({len(self.ffn[i])}):")
                lines += _top_bottom(self.ffn[i], (s.get("ffn") or {}).get(i), top)
            if i in self.attn_heads:
                groups = config.num_query_groups if config is not None else 1
                lines.append("Query heads per KV group (most important first):")
                lines += _grouped(self.attn_heads[i], (s.get("attn_heads") or {}).get(i), groups)
            if i in self.mamba_heads:
                groups = config.mamba_num_groups if config is not None else 1
                lines.append("Mamba heads per B/C group (most important first):")
                lines += _grouped(self.mamba_heads[i], (s.get("mamba_heads") or {}).get(i), groups)
                lines.append(f"Mamba head channels ({len(self.mamba_head_dim[i])}):")
                lines += _top_bottom(self.mamba_head_dim[i], (s.get("mamba_head_dim") or {}).get(i), top)
            if i in self.moe_experts:
                groups = config.moe_router_num_groups if config is not None else 1
                lines.append("Routed experts per routing group (most important first):")
                lines += _grouped(self.moe_experts[i], (s.get("moe_experts") or {}).get(i), groups)
                lines.append(f"Expert neurons ({len(self.moe_ffn[i])}):")
                lines += _top_bottom(self.moe_ffn[i], (s.get("moe_ffn") or {}).get(i), top)
                lines.append(f"Shared-expert neurons ({len(self.moe_shared_ffn[i])}):")
                lines += _top_bottom(self.moe_shared_ffn[i], (s.get("moe_shared_ffn") or {}).get(i), top)
            lines.append("")

        lines += [f"## Depth ({self.depth_method}): removal order, least important first", ""]
        depth_scores = s.get("depth") or []
        influence = s.get("block_influence") or []
        header = "| removed | layer | type | score |" + (" block influence |" if influence else "")
        lines += [header, "|---|---|---|---|" + ("---|" if influence else "")]
        for rank, layer in enumerate(self.depth):
            kind = LAYER_NAMES[types[layer]] if types else "?"
            score = _fmt(depth_scores[rank]) if rank < len(depth_scores) else "-"
            row = f"| {rank + 1} | {layer} | {kind} | {score} |"
            if influence:
                row += f" {_fmt(influence[layer])} |"
            lines.append(row)
        lines.append("")
        return "\n".join(lines)


def _check_perm(where: str, order, size: int, groups: int = 1) -> None:
    values = list(order)
    if len(values) != size or sorted(values) != list(range(size)):
        raise ConfigError(
            f"ranking {where} is not a permutation of 0..{size - 1} (got {len(values)} entries); "
            "the ranking was computed for another model"
        )
    per = size // groups
    for pos, v in enumerate(values):
        if v // per != pos // per:
            raise ConfigError(
                f"ranking {where} moves index {v} (group {v // per}) to position {pos} (group {pos // per}); "
                "heads may only be reordered inside their group"
            )


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _fmt(v) -> str:
    return "-" if v is None else f"{float(v):.4g}"


def _top_bottom(order: list[int], scores, top: int) -> list[str]:
    def items(idx):
        return ", ".join(f"{i} ({_fmt(scores[i])})" if scores is not None else str(i) for i in idx)

    if len(order) <= 2 * top:
        return [f"- order: {items(order)}"]
    return [f"- top {top}: {items(order[:top])}", f"- bottom {top}: {items(order[-top:])}"]


def _grouped(order: list[int], scores, groups: int) -> list[str]:
    per = len(order) // groups
    out = []
    for g in range(groups):
        block = order[g * per : (g + 1) * per]
        text = ", ".join(f"{i} ({_fmt(scores[i])})" if scores is not None else str(i) for i in block)
        out.append(f"- group {g}: {text}")
    return out


# ---------------------------------------------------------------------- orders from scores
def ranked(scores: torch.Tensor, groups: int = 1) -> list[int]:
    """Indices by descending score inside each of ``groups`` contiguous blocks (stable: ties keep
    the lower index first), as global indices."""
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    per = scores.numel() // groups
    local = torch.argsort(scores.view(groups, per), dim=1, descending=True, stable=True)
    return (local + torch.arange(groups)[:, None] * per).reshape(-1).tolist()


def mamba_scores(S: torch.Tensor, top_channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(head scores (H,), channel scores (P,)) from the summed |x| activations ``S`` (H, P)."""
    chan = torch.linalg.vector_norm(S, ord=2, dim=0)
    k = S.shape[1] if top_channels is None else max(1, min(int(top_channels), S.shape[1]))
    top = torch.tensor(ranked(chan)[:k])
    heads = torch.linalg.vector_norm(S[:, top], ord=2, dim=1)
    return heads, chan


# ---------------------------------------------------------------------- forward passes
def _tokens(batch) -> torch.Tensor:
    """A calibration batch: a (b, L) token tensor or a ``(tokens, labels)`` pair."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not torch.is_tensor(batch) or batch.dim() != 2:
        raise ConfigError("calibration batches must be (batch, length) token tensors or (tokens, labels) pairs")
    return batch


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def activation_scores(model, batches: Iterable, *, log: Callable[[str], None] | None = None) -> dict:
    """One forward pass per batch with temporary forward hooks (removed afterwards, also on errors).

    Returns float64 CPU tensors: ``hidden`` (d,), ``ffn`` {layer: (F,)}, ``attn_channels``
    {layer: (heads*head_dim,)}, ``mamba_x`` {layer: (H, P)}, ``moe_experts`` {layer: (E,)}, ``moe_ffn``
    {layer: (expert F,)}, ``moe_shared_ffn`` {layer: (shared F,)}, ``block_influence`` (num_layers,),
    and ``tokens`` (int).
    """
    cfg = model.config
    dev = _device(model)
    acc = {"hidden": torch.zeros(cfg.hidden_size, dtype=torch.float64, device=dev),
           "ffn": {}, "attn_channels": {}, "mamba_x": {}, "moe_experts": {}, "moe_ffn": {}, "moe_shared_ffn": {}}  # fmt: skip
    influence = torch.zeros(cfg.num_layers, dtype=torch.float64, device=dev)
    counted = {"tokens": 0}

    def absum(t: torch.Tensor) -> torch.Tensor:  # sum of |t| over batch and tokens, in float64
        return t.detach().float().abs().sum(dim=(0, 1)).double()

    def hidden_hook(module, args, out):
        acc["hidden"] += absum(out)

    def store(kind, i, value):
        acc[kind][i] = value if i not in acc[kind] else acc[kind][i] + value

    def ffn_hook(i, module, args, out):
        store("ffn", i, absum(out))

    def attn_hook(i, module, args, out):
        store("attn_channels", i, absum(out))

    def mamba_hook(i, layout, module, args, out):
        b, L, _ = out.shape
        x = out[..., layout.component("x").slice].reshape(b, L, layout.num_heads, layout.head_dim)
        store("mamba_x", i, absum(x))

    def shared_hook(i, module, args, out):
        store("moe_shared_ffn", i, absum(out))

    def experts_hook(i, module, args, out):  # recomputes each expert on its tokens: per-expert outputs
        x, indices, weights = args[:3]
        K = indices.shape[1]
        flat = indices.reshape(-1)
        expert_score = torch.zeros(module.num_experts, dtype=torch.float64, device=x.device)
        neuron_score = torch.zeros(module.up_proj.shape[1], dtype=torch.float64, device=x.device)
        for e in flat.unique().tolist():
            slots = (flat == e).nonzero().squeeze(1)
            up = F.linear(x[slots // K].float(), module.up_proj[e].float())
            neuron_score += up.abs().sum(0).double()
            y = F.linear(torch.square(F.relu(up)), module.down_proj[e].float()) * weights.reshape(-1)[slots, None]
            expert_score[e] = torch.linalg.vector_norm(y, dim=-1).double().sum()
        store("moe_experts", i, expert_score)
        store("moe_ffn", i, neuron_score)

    def block_hook(i, module, args, out):
        cos = F.cosine_similarity(args[0].detach().float(), out.detach().float(), dim=-1)  # (b, L)
        influence[i] += (1.0 - cos).double().sum()

    handles = []
    was_training = model.training
    model.eval()
    try:
        for i, block in enumerate(model.layers):
            handles.append(block.norm.register_forward_hook(hidden_hook))
            handles.append(block.register_forward_hook(partial(block_hook, i)))
            mixer = block.mixer
            if block.layer_type == MLP:
                handles.append(mixer.up_proj.register_forward_hook(partial(ffn_hook, i)))
            elif block.layer_type == ATTENTION:
                handles.append(mixer.q_proj.register_forward_hook(partial(attn_hook, i)))
            elif block.layer_type == MOE:
                handles.append(mixer.experts.register_forward_hook(partial(experts_hook, i)))
                handles.append(mixer.shared_experts.up_proj.register_forward_hook(partial(shared_hook, i)))
            else:
                handles.append(mixer.in_proj.register_forward_hook(partial(mamba_hook, i, MambaLayout.of(cfg, i))))
        handles.append(model.final_norm.register_forward_hook(hidden_hook))
        for n, batch in enumerate(batches):
            tokens = _tokens(batch).to(dev)
            model(tokens)
            counted["tokens"] += tokens.numel()
            if log:
                log(f"[importance] activations: batch {n + 1} ({counted['tokens']:,} tokens)")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if counted["tokens"] == 0:
        raise ConfigError("no calibration batches; give at least one batch of tokens")

    def cpu(v):
        return {k: cpu(x) for k, x in v.items()} if isinstance(v, dict) else v.cpu()

    out = {k: cpu(v) for k, v in acc.items()}
    out["block_influence"] = (influence / counted["tokens"]).cpu()
    out["tokens"] = counted["tokens"]
    return out


def _skip_state(num_layers: int, skipped: set[int]) -> ElasticState:
    return ElasticState(layers=[LayerMask(keep=0.0 if i in skipped else 1.0) for i in range(num_layers)])


@torch.no_grad()
def depth_iterative_mse(model, batches: list, *, log: Callable[[str], None] | None = None):
    """Iterative normalized-MSE layer removal (see the module docstring).

    Returns (removal order, the score of each layer when it was removed, one {layer: score} per step).
    Full-model logits are recomputed per batch and step rather than cached (they are vocab-sized).
    """
    cfg = model.config
    n = cfg.num_layers
    dev = _device(model)
    removed: list[int] = []
    removal_scores: list[float] = []
    steps: list[dict[int, float]] = []
    was_training = model.training
    model.eval()
    try:
        for step in range(n):
            remaining = [j for j in range(n) if j not in removed]
            num = {j: 0.0 for j in remaining}
            den = 0.0
            base = set(removed)
            for batch in batches:
                tokens = _tokens(batch).to(dev)
                full = model(tokens).double()
                den += full.pow(2).sum().item()
                for j in remaining:
                    cut = model(tokens, elastic=_skip_state(n, base | {j})).double()
                    num[j] += (full - cut).pow(2).sum().item()
            scores = {j: num[j] / den if den > 0 else num[j] for j in remaining}
            best = min(remaining, key=lambda j: (scores[j], j))
            removed.append(best)
            removal_scores.append(scores[best])
            steps.append(scores)
            if log:
                log(f"[importance] depth step {step + 1}/{n}: remove layer {best} "
                    f"({LAYER_NAMES[cfg.layer_types[best]]}), normalized MSE {scores[best]:.4g}")  # fmt: skip
    finally:
        model.train(was_training)
    return removed, removal_scores, steps


def depth_random(num_layers: int, seed: int) -> list[int]:
    return torch.randperm(num_layers, generator=torch.Generator().manual_seed(int(seed))).tolist()


# ---------------------------------------------------------------------- everything at once
def compute_ranking(model, batches: Iterable, *, depth_method: str = "iterative-mse", seed: int = 0,
                    mamba_top_channels: int | None = None,
                    log: Callable[[str], None] | None = None) -> Ranking:  # fmt: skip
    """Importance of every axis of ``model`` (a :class:`~megatron_elastic.model.HybridLM`) on
    ``batches`` (token tensors or ``(tokens, labels)`` pairs; read twice for ``iterative-mse``).

    ``mamba_top_channels``: how many of the best channels a Mamba head's score uses (default: all).
    """
    if depth_method not in DEPTH_METHODS:
        raise ConfigError(f"depth method {depth_method!r} is unknown; use one of {', '.join(DEPTH_METHODS)}")
    cfg = model.config
    batches = [_tokens(b) for b in batches]
    act = activation_scores(model, batches, log=log)

    scores: dict = {"hidden": act["hidden"].tolist(), "ffn": {}, "attn_heads": {}, "mamba_heads": {},
                    "mamba_head_dim": {}, "moe_experts": {}, "moe_ffn": {}, "moe_shared_ffn": {},
                    "block_influence": act["block_influence"].tolist()}  # fmt: skip
    orders: dict = {axis: {} for axis in _PER_LAYER_AXES}
    for i in range(cfg.num_layers):
        d = cfg.layer_dims(i)
        if d.kind == MLP:
            s = act["ffn"][i]
            orders["ffn"][i] = ranked(s)
            scores["ffn"][i] = s.tolist()
        elif d.kind == ATTENTION:
            heads = torch.linalg.vector_norm(act["attn_channels"][i].view(d.num_attention_heads, cfg.head_dim), dim=1)
            orders["attn_heads"][i] = ranked(heads, cfg.num_query_groups)
            scores["attn_heads"][i] = heads.tolist()
        elif d.kind == MOE:
            for axis in _MOE_RANKING_AXES:
                s = act[axis][i]
                orders[axis][i] = ranked(s, cfg.moe_router_num_groups if axis == "moe_experts" else 1)
                scores[axis][i] = s.tolist()
        else:
            heads, chans = mamba_scores(act["mamba_x"][i], mamba_top_channels)
            orders["mamba_heads"][i] = ranked(heads, cfg.mamba_num_groups)
            orders["mamba_head_dim"][i] = ranked(chans)
            scores["mamba_heads"][i] = heads.tolist()
            scores["mamba_head_dim"][i] = chans.tolist()

    if depth_method == "iterative-mse":
        depth, depth_scores, steps = depth_iterative_mse(model, batches, log=log)
        scores["depth"] = depth_scores
        scores["depth_steps"] = steps
    elif depth_method == "block-influence":
        infl = act["block_influence"]
        depth = torch.argsort(infl, stable=True).tolist()  # least influential first
        scores["depth"] = [float(infl[j]) for j in depth]
    else:
        depth = depth_random(cfg.num_layers, seed)
        scores["depth"] = []

    b, L = batches[0].shape
    meta = {"batches": len(batches), "batch_size": int(b), "seq_len": int(L), "tokens": int(act["tokens"]),
            "depth_method": depth_method, "seed": int(seed),
            "mamba_top_channels": mamba_top_channels if mamba_top_channels is not None else "all"}  # fmt: skip
    ranking = Ranking(hidden=ranked(act["hidden"]), depth=depth, depth_method=depth_method, scores=scores, meta=meta,
                      **orders)  # fmt: skip
    ranking.check(cfg)
    return ranking
