"""The elastic search space of one parent: the allowed sizes of every axis.

Sizes are given as fractions of the parent (``ffn=[1.0, 0.75, 0.5]``) and turned into concrete
integers once, here:

=================  ==============================================================================
axis               unit a size is rounded down to (never below one unit)
=================  ==============================================================================
hidden, ffn,       ``multiple_of`` channels (FP8 GEMMs want dimensions that are multiples of 16)
mamba_head_dim
attn_heads         a multiple of ``num_query_groups`` (the same count in every KV group) such that
                   ``heads * head_dim`` is a multiple of ``multiple_of``
mamba_heads        a multiple of ``mamba_num_groups`` (group-aware trimming) such that
                   ``heads * mamba_head_dim`` is a multiple of ``multiple_of``
moe_experts        a multiple of ``moe_router_num_groups`` (the same count in every routing group),
                   never below 2 per group
moe_ffn,           ``multiple_of`` neurons
moe_shared_ffn
depth              one layer; a choice is the number of layers kept
=================  ==============================================================================

Fraction 1.0 is always the parent's own size. Fractions that round to the same size collapse into
one choice (with a warning). Every axis's choices are nested: unique, largest first, the first is
the parent's size, so a smaller choice's prefix mask lies inside a larger one's.

Depth keeps the same layers for every budget that keeps the same count: the layers dropped at
count ``c`` are the first ``num_layers - c`` of ``depth_order`` (the removal order, least
important first, as ``Ranking.depth`` gives it). Without an order the last layer goes first,
then the one before it, and so on — rank the layers (``megatron-elastic importance``) rather than
rely on this. ``protect_attention`` keeps attention layers out of depth cuts and their heads whole.

Homogeneous spaces pick one choice per axis for the whole model; heterogeneous spaces pick the
FFN / attention / Mamba / MoE sizes per layer (``hidden`` and ``depth`` stay global). An MoE layer's
top-k follows its expert count: the parent's, lowered where fewer experts are reachable. The parent must be
homogeneous (no per-layer sizes) so that a choice means the same size on every layer of a type.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch

from megatron_elastic.config.schema import check_fractions
from megatron_elastic.elastic.space import (
    AXES,
    AXIS_FIELD,
    AXIS_KIND,
    WIDTH_AXES,
    Architecture,
    Axis,
    MOE_AXES,
    LayerArch,
    axes_of,
    reachable_topk,
)
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import ATTENTION, LAYER_NAMES, MAMBA, MLP, MOE, HybridConfig

# Axes whose choice is made per layer in a heterogeneous space, and the layer type they live on.
LAYER_AXIS_KIND = AXIS_KIND

# Parent fields that decide the shapes (and so the costs) of every submodel; check_parent compares them.
_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
    "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim", "mamba_conv_kernel",
    "mamba_conv_bias", "mamba_proj_bias", "mlp_bias", "tie_embeddings", "num_moe_experts", "moe_router_topk",
    "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_num_groups", "moe_router_group_topk",
    "moe_latent_size",
)  # fmt: skip


def _round_down(fraction: float, full: int, unit: int) -> int:
    if fraction == 1.0:
        return full
    # 1e-9 absorbs float error in products such as 0.875 * 8 that are meant to be exact.
    return max(unit, math.floor(fraction * full / unit + 1e-9) * unit)


class ElasticSpace:
    """The allowed sizes of every elastic axis of one parent (see the module docstring).

    Attributes: ``config`` (the parent), ``axes`` (axis name -> :class:`Axis` with ``choices``,
    largest first; ``depth`` choices are counts of kept layers), ``depth_order`` (every layer, least
    important first, as given), ``removal_order`` (the layers depth cuts drop, in order: attention
    layers left out when protected), ``heterogeneous``, ``multiple_of``, ``protect_attention`` and
    ``fractions`` (what the space was built from; None when built from sizes).
    """

    def __init__(self, config: HybridConfig, *, hidden: Sequence[float] = (1.0,), ffn: Sequence[float] = (1.0,),
                 attn_heads: Sequence[float] = (1.0,), mamba_heads: Sequence[float] = (1.0,),
                 mamba_head_dim: Sequence[float] = (1.0,), moe_experts: Sequence[float] = (1.0,),
                 moe_ffn: Sequence[float] = (1.0,), moe_shared_ffn: Sequence[float] = (1.0,),
                 depth: Sequence[float] = (1.0,),
                 depth_order: Sequence[int] | None = None, heterogeneous: bool = False, multiple_of: int = 1,
                 protect_attention: bool = False):  # fmt: skip
        _check_options(config, multiple_of)
        fractions = {"hidden": hidden, "ffn": ffn, "attn_heads": attn_heads, "mamba_heads": mamba_heads,
                     "mamba_head_dim": mamba_head_dim, "moe_experts": moe_experts, "moe_ffn": moe_ffn,
                     "moe_shared_ffn": moe_shared_ffn, "depth": depth}  # fmt: skip
        fractions = {name: check_fractions(f"elastic.{name}", values) for name, values in fractions.items()}
        units = _units(config, multiple_of)
        full = {name: axis.full for name, axis in axes_of(config).items()}
        sizes: dict[str, list[int]] = {}
        for name in WIDTH_AXES:
            if name == "attn_heads" and protect_attention:
                sizes[name] = [full[name]]
                continue
            if name in MOE_AXES and any(f < 1.0 for f in fractions[name]) and MOE not in config.layer_types:
                raise ConfigError(f"elastic.{name}={list(fractions[name])} shrinks mixture-of-experts layers but the "
                                  f"parent has no 'E' layers; set elastic.{name} to [1.0]")  # fmt: skip
            if any(f < 1.0 for f in fractions[name]) and units[name] > full[name]:
                raise ConfigError(
                    f"elastic.{name}: the parent's {name} size {full[name]} is smaller than the alignment unit "
                    f"{units[name]} (from multiple_of={multiple_of}); lower multiple_of or use [1.0] for {name}"
                )
            sizes[name] = [max(_floor(config, name), _round_down(f, full[name], units[name])) for f in fractions[name]]
        floor = max(1, config.layer_types.count(ATTENTION)) if protect_attention else 1
        sizes["depth"] = [max(floor, _round_down(f, full["depth"], 1)) for f in fractions["depth"]]
        for name in AXES:
            unique = sorted(set(sizes[name]), reverse=True)
            if len(unique) < len(sizes[name]):
                warnings.warn(
                    f"elastic.{name}: fractions {fractions[name]} give the sizes {sizes[name]} after rounding "
                    f"(unit {units.get(name, 1)}); the duplicates are merged into {unique}",
                    stacklevel=2,
                )
            sizes[name] = unique
        self._build(config, sizes, depth_order=depth_order, heterogeneous=heterogeneous, multiple_of=multiple_of,
                    protect_attention=protect_attention)  # fmt: skip
        self.fractions = fractions

    @classmethod
    def from_config(cls, model: HybridConfig, elastic, depth_order: Sequence[int] | None = None) -> ElasticSpace:
        """The space a run's ``elastic`` section (:class:`~megatron_elastic.config.ElasticConfig`) describes
        for the parent ``model``; ``depth_order`` is the importance ranking's removal order (None = none)."""
        e = elastic
        return cls(model, hidden=e.hidden, ffn=e.ffn, attn_heads=e.attn_heads, mamba_heads=e.mamba_heads,
                   mamba_head_dim=e.mamba_head_dim, moe_experts=e.moe_experts, moe_ffn=e.moe_ffn,
                   moe_shared_ffn=e.moe_shared_ffn, depth=e.depth, depth_order=depth_order,
                   heterogeneous=e.heterogeneous, multiple_of=e.multiple_of,
                   protect_attention=e.protect_attention)  # fmt: skip

    @classmethod
    def from_sizes(cls, config: HybridConfig, sizes: Mapping[str, Sequence[int]], *,
                   depth_order: Sequence[int] | None = None, heterogeneous: bool = False, multiple_of: int = 1,
                   protect_attention: bool = False) -> ElasticSpace:  # fmt: skip
        """A space from concrete sizes per axis (``depth``: kept-layer counts); missing axes = parent only."""
        _check_options(config, multiple_of)
        unknown = sorted(set(sizes) - set(AXES))
        if unknown:
            raise ConfigError(f"elastic space: unknown axis {unknown[0]!r}; the axes are {', '.join(AXES)}")
        full = {name: axis.full for name, axis in axes_of(config).items()}
        resolved = {name: list(sizes.get(name, [full[name]])) for name in AXES}
        space = cls.__new__(cls)
        space._build(config, resolved, depth_order=depth_order, heterogeneous=heterogeneous, multiple_of=multiple_of,
                     protect_attention=protect_attention)  # fmt: skip
        space.fractions = None
        return space

    def _build(self, config: HybridConfig, sizes: dict[str, list[int]], *, depth_order, heterogeneous: bool,
               multiple_of: int, protect_attention: bool) -> None:  # fmt: skip
        if not isinstance(heterogeneous, bool) or not isinstance(protect_attention, bool):
            raise ConfigError("elastic.heterogeneous and elastic.protect_attention must be true or false")
        self.config = config
        self.heterogeneous = heterogeneous
        self.multiple_of = multiple_of
        self.protect_attention = protect_attention
        parent_axes = axes_of(config)
        units = _units(config, multiple_of)
        self.axes: dict[str, Axis] = {}
        for name in AXES:
            values = sizes[name]
            if isinstance(values, (str, bytes)) or not values:
                raise ConfigError(f"elastic.{name} sizes {values!r} are empty; give at least the parent's size")
            ax = parent_axes[name]
            axis = Axis(name, ax.full, groups=ax.groups, choices=tuple(values))  # checks nested, divisible, <= full
            if axis.choices[0] != ax.full:
                raise ConfigError(
                    f"elastic.{name} sizes {list(values)} must start with the parent's size {ax.full}; add it"
                )
            for k in axis.choices[1:]:
                if k % units[name]:
                    raise ConfigError(
                        f"elastic.{name} size {k} is not a multiple of {units[name]} (multiple_of={multiple_of}"
                        f"{' and the group count' if ax.groups > 1 else ''}); round it down"
                    )
            if axis.choices[-1] < _floor(config, name):
                raise ConfigError(f"elastic.{name} size {axis.choices[-1]} leaves fewer than 2 experts in each of the "
                                  f"{ax.groups} routing groups; keep at least {_floor(config, name)}")  # fmt: skip
            self.axes[name] = axis
        num_attention = config.layer_types.count(ATTENTION)
        if protect_attention:
            if len(self.axes["attn_heads"].choices) > 1:
                raise ConfigError("elastic.protect_attention keeps attention heads whole; set attn_heads to [1.0]")
            smallest = self.axes["depth"].choices[-1]
            if smallest < num_attention:
                raise ConfigError(
                    f"elastic.depth keeps as few as {smallest} layers but protect_attention keeps all "
                    f"{num_attention} attention layers; raise the smallest depth choice"
                )
        n = config.num_layers
        if depth_order is None:
            order = list(range(n - 1, -1, -1))  # no ranking: drop from the last layer backwards
        else:
            order = list(depth_order)
            if any(isinstance(i, bool) or not isinstance(i, int) for i in order) or sorted(order) != list(range(n)):
                raise ConfigError(
                    f"depth_order {order} is not a permutation of the parent's layers 0..{n - 1}; pass the "
                    "ranking's depth removal order (least important first)"
                )
        self.depth_order = order
        # What depth choices actually drop, in order: attention layers are skipped when protected.
        self.removal_order = [i for i in order if not (protect_attention and config.layer_types[i] == ATTENTION)]

    # ------------------------------------------------------------------ structure
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def choices(self, axis: str) -> tuple[int, ...]:
        return self.axes[axis].choices

    def layer_indices(self, axis: str) -> list[int]:
        """Parent indices of the layers ``axis`` lives on (``hidden`` / ``depth``: every layer)."""
        kind = LAYER_AXIS_KIND.get(axis)
        return [i for i, k in enumerate(self.config.layer_types) if kind is None or k == kind]

    def is_per_layer(self, axis: str) -> bool:
        """True when ``axis`` has one choice per layer (heterogeneous spaces, FFN / attention / Mamba axes)."""
        return self.heterogeneous and axis in LAYER_AXIS_KIND

    def prob_shape(self, axis: str) -> tuple[int, ...]:
        """Shape of the probability tensor of ``axis``: (choices,) or (layers of its type, choices)."""
        n = len(self.axes[axis].choices)
        return (len(self.layer_indices(axis)), n) if self.is_per_layer(axis) else (n,)

    def is_searchable(self, axis: str) -> bool:
        """True when the axis offers a real choice: more than one size and a layer to apply it to."""
        return len(self.axes[axis].choices) > 1 and bool(self.layer_indices(axis))

    def dropped_layers(self, depth_choice: int) -> list[int]:
        """Parent layers dropped at depth choice index ``depth_choice`` (sorted)."""
        kept = self.axes["depth"].choices[depth_choice]
        return sorted(self.removal_order[: self.num_layers - kept])

    def keep_matrix(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """(depth choices, layers): 1 where a depth choice keeps the layer; ``probs @ this`` = P(kept)."""
        if getattr(self, "_keep", None) is None:
            m = torch.ones(len(self.axes["depth"].choices), self.num_layers, dtype=torch.float64)
            for c in range(m.shape[0]):
                m[c, self.dropped_layers(c)] = 0
            self._keep = m
        return self._keep.to(dtype=dtype, device=device)

    # ------------------------------------------------------------------ architectures
    def full_indices(self) -> dict[str, int | list[int]]:
        """Choice indices of the parent itself (index 0 everywhere)."""
        return {a: [0] * len(self.layer_indices(a)) if self.is_per_layer(a) else 0 for a in AXES}

    def architecture(self, choice_index_per_axis: Mapping[str, int | Sequence[int]]) -> Architecture:
        """The submodel of the given choice indices (0 = largest). Homogeneous: one int per axis.
        Heterogeneous: ffn / attn_heads / mamba_heads / mamba_head_dim take one int per layer of
        their type, in pattern order (an int applies to all). Missing axes take index 0."""
        unknown = sorted(set(choice_index_per_axis) - set(AXES))
        if unknown:
            raise ConfigError(f"unknown axis {unknown[0]!r}; the axes are {', '.join(AXES)}")
        per_layer: dict[str, list[int]] = {}
        sizes: dict[str, int] = {}
        for axis in AXES:
            value = choice_index_per_axis.get(axis, 0)
            choices = self.axes[axis].choices
            count = len(self.layer_indices(axis))
            if self.is_per_layer(axis) and not isinstance(value, int):
                value = [int(v) for v in value]
                if len(value) != count:
                    raise ConfigError(f"{axis} has {len(value)} choice indices for {count} layers; give one per layer")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{axis} choice index {value!r} must be one int (the axis is global)")
            for v in value if isinstance(value, list) else [value]:
                if not 0 <= v < len(choices):
                    raise ConfigError(f"{axis} choice index {v} is out of range; it has {len(choices)} choices")
            if isinstance(value, list):
                per_layer[axis] = [choices[v] for v in value]
            else:
                sizes[axis] = choices[value]
                per_layer[axis] = [choices[value]] * count
        dropped = set(self.removal_order[: self.num_layers - sizes["depth"]])
        nth = {a: 0 for a in LAYER_AXIS_KIND}
        layers = []
        for i, kind in enumerate(self.config.layer_types):
            kw = {}
            for axis, field in AXIS_FIELD.items():
                if LAYER_AXIS_KIND[axis] == kind:
                    kw[field] = per_layer[axis][nth[axis]]
                    nth[axis] += 1
            if kind == MOE:
                kw["moe_router_topk"] = min(self.config.moe_router_topk, reachable_topk(self.config, kw["num_moe_experts"]))
            layers.append(LayerArch(kind=kind, keep=i not in dropped, **kw))
        return Architecture(hidden_size=sizes["hidden"], layers=tuple(layers))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """JSON-safe: the parent's config, the options and the resolved sizes (the source of truth)."""
        return {
            "parent": self.config.to_dict() | {"mamba_dt_limit": [float(v) if math.isfinite(v) else str(v)
                                                                   for v in self.config.mamba_dt_limit]},
            "heterogeneous": self.heterogeneous,
            "multiple_of": self.multiple_of,
            "protect_attention": self.protect_attention,
            "depth_order": list(self.depth_order),
            "sizes": {name: list(axis.choices) for name, axis in self.axes.items()},
            "fractions": None if self.fractions is None else {k: list(v) for k, v in self.fractions.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping) -> ElasticSpace:
        try:
            parent = dict(data["parent"])
            parent["mamba_dt_limit"] = [float(v) for v in parent.get("mamba_dt_limit", [0.001, math.inf])]
            space = cls.from_sizes(
                HybridConfig.from_dict(parent, where="elastic space parent"), data["sizes"],
                depth_order=data["depth_order"], heterogeneous=data["heterogeneous"],
                multiple_of=data["multiple_of"], protect_attention=data["protect_attention"],
            )  # fmt: skip
        except (KeyError, TypeError) as err:
            raise ConfigError(
                f"elastic space data is malformed ({err!r}); save it again with ElasticSpace.to_dict"
            ) from None
        fractions = data.get("fractions")
        space.fractions = None if fractions is None else {k: list(v) for k, v in fractions.items()}
        return space

    def check_parent(self, config: HybridConfig) -> None:
        """Raise ConfigError unless ``config`` has the shape this space was built for."""
        if config.layer_types != self.config.layer_types:
            raise ConfigError(
                f"the elastic space was built for pattern {''.join(self.config.layer_types)!r} but the model has "
                f"{''.join(config.layer_types)!r}; rebuild the space for this parent or load the matching checkpoint"
            )
        for name in _SHAPE_FIELDS + tuple(f"{a}_per_layer" for a in (*AXIS_FIELD.values(), "moe_router_topk")):
            ours, theirs = getattr(self.config, name), getattr(config, name)
            if ours != theirs:
                raise ConfigError(
                    f"the elastic space was built for a parent with {name}={ours} but the model has {name}={theirs}; "
                    "rebuild the space for this parent or load the matching checkpoint"
                )

    def rounding(self) -> list[str]:
        """One line per fraction that did not land exactly on a size: the size actually used and why
        (e.g. ``attn_heads 0.5 -> 16 of 40 (a multiple of the 8 KV groups)``); [] when built from sizes."""
        if self.fractions is None:
            return []
        units = _units(self.config, self.multiple_of)
        what = {"attn_heads": f"whole KV groups ({self.config.num_query_groups})",
                "mamba_heads": f"whole Mamba groups ({self.config.mamba_num_groups})",
                "moe_experts": f"whole routing groups ({self.config.moe_router_num_groups})"}  # fmt: skip
        lines = []
        for name in WIDTH_AXES:
            full = self.axes[name].full
            for f in self.fractions[name]:
                size = _round_down(f, full, units[name])
                if abs(size - f * full) > 1e-6 and size in self.axes[name].choices:
                    unit = what.get(name, f"elastic.multiple_of={self.multiple_of}")
                    lines.append(f"elastic.{name} {f:g} -> {size} of {full} ({f * full:g} rounded to a multiple "
                                 f"of {units[name]}: {unit})")  # fmt: skip
        return lines

    def __repr__(self) -> str:
        axes = ", ".join(f"{name}={list(axis.choices)}" for name, axis in self.axes.items())
        return f"ElasticSpace({axes}, heterogeneous={self.heterogeneous})"


def _check_options(config: HybridConfig, multiple_of: int) -> None:
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of <= 0:
        raise ConfigError(f"elastic.multiple_of={multiple_of!r} is invalid; it must be a positive integer")
    if config.is_heterogeneous:
        raise ConfigError(
            "the elastic parent has per-layer sizes (a heterogeneous config); build the space on a parent whose "
            f"{LAYER_NAMES[MLP]}/{LAYER_NAMES[ATTENTION]}/{LAYER_NAMES[MAMBA]} layers all share one size"
        )


def _units(config: HybridConfig, multiple_of: int) -> dict[str, int]:
    """Smallest allowed step of each width axis (see the module docstring)."""
    def heads_unit(groups: int, head_dim: int) -> int:
        return groups * (multiple_of // math.gcd(multiple_of, groups * head_dim))

    return {
        "hidden": multiple_of,
        "ffn": multiple_of,
        "attn_heads": heads_unit(config.num_query_groups, config.head_dim),
        "mamba_heads": heads_unit(config.mamba_num_groups, config.mamba_head_dim),
        "mamba_head_dim": multiple_of,
        "moe_experts": config.moe_router_num_groups if MOE in config.layer_types else 1,
        "moe_ffn": multiple_of,
        "moe_shared_ffn": multiple_of,
        "depth": 1,
    }


def _floor(config: HybridConfig, axis: str) -> int:
    """Smallest size of ``axis``: 2 experts per routing group (a group is scored by its two best), else 1."""
    return 2 * config.moe_router_num_groups if axis == "moe_experts" and MOE in config.layer_types else 1
