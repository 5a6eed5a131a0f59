"""Elastic axes, architectures and the masks that realise them.

After importance permutation every submodel is a *prefix* of the parent on each axis:

=================  ==============================================================================
axis               what a size ``k`` keeps
=================  ==============================================================================
hidden             residual channels ``0..k-1`` (embeddings, every norm, every projection's d side)
ffn                neurons ``0..k-1`` of an MLP layer
attn_heads         ``k / G_kv`` query heads inside *each* KV group (query heads ``g*Q/G_kv + j``,
                   ``j < k/G_kv``); KV heads are never trimmed, so the child keeps a valid GQA shape
mamba_heads        ``k / G`` heads inside *each* B/C group (group-aware); B and C are never masked
mamba_head_dim     channels ``0..k-1`` of every Mamba head
moe_experts        ``k / G_r`` routed experts inside *each* routing group (``moe_router_num_groups``),
                   at least 2 per group; the router's rows and correction bias go with their experts,
                   and routing runs over the kept experts only
moe_ffn            neurons ``0..k-1`` of every routed expert of an MoE layer
moe_shared_ffn     neurons ``0..k-1`` of the shared expert of an MoE layer
depth              a dropped layer is the identity
=================  ==============================================================================

An MoE layer's top-k (experts per token) is a choice of the architecture too, made at inference time:
training and the router keep the parent's top-k, lowered only where fewer experts are reachable (the
kept experts of the ``moe_router_group_topk`` groups a token may use).

An :class:`Architecture` says, per layer, which size each axis takes (homogeneous: the same for
all layers of a type; heterogeneous: per layer; the hidden size is always global). It turns into
an :class:`~megatron_elastic.model.ElasticState` of hard masks (:func:`hard_state`) or into the
config of the sliced child (:func:`child_config`), and into the slice plan of
:mod:`megatron_elastic.model.layout` (:func:`slice_plan`) that extraction and view children cut with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from megatron_elastic.errors import CheckpointError, ConfigError, shown
from megatron_elastic.model.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from megatron_elastic.model.elastic_state import ElasticState, LayerMask
from megatron_elastic.model.layout import LayerKeep, Take, compact, layer_plan, model_plan

WIDTH_AXES = ("hidden", "ffn", "attn_heads", "mamba_heads", "mamba_head_dim", "moe_experts", "moe_ffn", "moe_shared_ffn")
MOE_AXES = ("moe_experts", "moe_ffn", "moe_shared_ffn")
# LayerArch / LayerDims field of each per-layer axis
AXIS_FIELD = {"ffn": "ffn_hidden_size", "attn_heads": "num_attention_heads", "mamba_heads": "mamba_num_heads",
              "mamba_head_dim": "mamba_head_dim", "moe_experts": "num_moe_experts", "moe_ffn": "moe_ffn_hidden_size",
              "moe_shared_ffn": "moe_shared_expert_intermediate_size"}  # fmt: skip
# the layer type each per-layer axis lives on
AXIS_KIND = {"ffn": MLP, "attn_heads": ATTENTION, "mamba_heads": MAMBA, "mamba_head_dim": MAMBA, "moe_experts": MOE,
             "moe_ffn": MOE, "moe_shared_ffn": MOE}  # fmt: skip
AXES = WIDTH_AXES + ("depth",)


@dataclass(frozen=True)
class Axis:
    """One elastic dimension: its full size, its groups and its allowed sizes (largest first)."""

    name: str
    full: int
    groups: int = 1
    """Sizes are trimmed equally inside each of ``groups`` contiguous blocks (1 = a plain prefix)."""
    choices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for k in self.choices:
            self.check_size(k)
        if list(self.choices) != sorted(set(self.choices), reverse=True):
            raise ConfigError(
                f"{self.name} choices {list(self.choices)} must be unique and sorted largest first "
                "(nested sizes); remove duplicates and sort them"
            )

    def check_size(self, k: int, where: str = "") -> None:
        at = f"{where}: " if where else ""
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ConfigError(f"{at}{self.name} size {k!r} is invalid; it must be a positive integer")
        if k > self.full:
            raise ConfigError(f"{at}{self.name} size {k} exceeds the parent's {self.full}; a child can only shrink")
        if k % self.groups:
            raise ConfigError(
                f"{at}{self.name} size {k} is not divisible by the {self.groups} groups; keep the same number "
                f"in every group (a multiple of {self.groups})"
            )

    @property
    def group_size(self) -> int:
        return self.full // self.groups

    def indices(self, k: int) -> torch.Tensor:
        """Parent indices kept at size ``k``: a prefix inside every group, in parent order."""
        per_group = k // self.groups
        base = torch.arange(self.groups)[:, None] * self.group_size
        return (base + torch.arange(per_group)[None, :]).reshape(-1)

    def mask(self, k: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """(full,) hard mask of size ``k``."""
        m = torch.zeros(self.groups, self.group_size, dtype=dtype, device=device)
        m[:, : k // self.groups] = 1
        return m.reshape(-1)

    def soft_mask(self, probs: torch.Tensor, sizes: tuple[int, ...] | None = None) -> torch.Tensor:
        """Probability-weighted sum of the prefix masks of ``sizes`` (default: the choices)."""
        sizes = self.choices if sizes is None else sizes
        stacked = torch.stack([self.mask(k, probs.device, probs.dtype) for k in sizes])  # (choices, full)
        return probs @ stacked


@dataclass(frozen=True)
class LayerArch:
    """One layer of a submodel: kept or skipped, and the sizes of the axes of its type."""

    kind: str
    keep: bool = True
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_router_topk: int | None = None


@dataclass(frozen=True)
class Architecture:
    """A concrete submodel of a parent, in the parent's (permuted) index space."""

    hidden_size: int
    layers: tuple[LayerArch, ...]

    def kept_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.keep]

    def to_dict(self) -> dict:
        return {"hidden_size": self.hidden_size, "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        """The inverse of :meth:`to_dict`; anything else (a file's architecture that is not one: keys
        missing or unknown, sizes not positive integers) is a one-line CheckpointError."""
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"architecture {shown(data)} is malformed ({why}); the file holding it is corrupt "
                                   "or was not written by megatron-elastic")  # fmt: skip

        def size(value, name: str, optional: bool = True):
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(f"{name}={shown(value)} is not a positive integer")
            return value

        if not isinstance(data, dict) or set(data) != {"hidden_size", "layers"}:
            raise bad("it must be an object with exactly hidden_size and layers")
        if not isinstance(data["layers"], list) or not data["layers"]:
            raise bad("layers must be a non-empty list")
        fields = {"kind", "keep", "moe_router_topk", *AXIS_FIELD.values()}
        layers = []
        for layer in data["layers"]:
            if not isinstance(layer, dict) or "kind" not in layer or not set(layer) <= fields:
                raise bad(f"layer {shown(layer)} must be an object with kind and sizes among {sorted(fields)}")
            if layer["kind"] not in (MAMBA, ATTENTION, MLP, MOE) or not isinstance(layer.get("keep", True), bool):
                raise bad(f"layer {shown(layer)} has a kind other than M, *, - or E, or a keep that is not true/false")
            layers.append(LayerArch(**{k: v if k in ("kind", "keep") else size(v, k) for k, v in layer.items()}))
        return cls(hidden_size=size(data["hidden_size"], "hidden_size", optional=False), layers=tuple(layers))


def axes_of(config: HybridConfig) -> dict[str, Axis]:
    """The parent's axes (no choices): full sizes and group structure. The MoE axes of a parent without
    MoE layers have size 1 (no layer to act on)."""
    c = config
    moe = MOE in c.layer_types
    return {
        "hidden": Axis("hidden", c.hidden_size),
        "ffn": Axis("ffn", c.ffn_hidden_size),
        "attn_heads": Axis("attn_heads", c.num_attention_heads, groups=c.num_query_groups),
        "mamba_heads": Axis("mamba_heads", c.mamba_num_heads, groups=c.mamba_num_groups),
        "mamba_head_dim": Axis("mamba_head_dim", c.mamba_head_dim),
        "moe_experts": Axis("moe_experts", c.num_moe_experts, groups=c.moe_router_num_groups) if moe
        else Axis("moe_experts", 1),
        "moe_ffn": Axis("moe_ffn", c.moe_ffn_hidden_size if moe else 1),
        "moe_shared_ffn": Axis("moe_shared_ffn", c.moe_shared_expert_intermediate_size if moe else 1),
        "depth": Axis("depth", c.num_layers),
    }


def layer_axes(config: HybridConfig, index: int) -> dict[str, Axis]:
    """The axes of one layer (per-layer full sizes of a heterogeneous parent)."""
    d = config.layer_dims(index)
    if d.kind == MLP:
        return {"ffn": Axis("ffn", d.ffn_hidden_size)}
    if d.kind == ATTENTION:
        return {"attn_heads": Axis("attn_heads", d.num_attention_heads, groups=config.num_query_groups)}
    if d.kind == MOE:
        return {"moe_experts": Axis("moe_experts", d.num_moe_experts, groups=config.moe_router_num_groups),
                "moe_ffn": Axis("moe_ffn", d.moe_ffn_hidden_size),
                "moe_shared_ffn": Axis("moe_shared_ffn", d.moe_shared_expert_intermediate_size)}  # fmt: skip
    return {
        "mamba_heads": Axis("mamba_heads", d.mamba_num_heads, groups=config.mamba_num_groups),
        "mamba_head_dim": Axis("mamba_head_dim", d.mamba_head_dim),
    }


def _layer_fields(kind: str) -> list[str]:
    """The LayerArch size fields of a layer of type ``kind``."""
    fields = [AXIS_FIELD[axis] for axis, k in AXIS_KIND.items() if k == kind]
    return fields + ["moe_router_topk"] if kind == MOE else fields


def full_architecture(config: HybridConfig) -> Architecture:
    layers = []
    for i in range(config.num_layers):
        d = config.layer_dims(i)
        layers.append(LayerArch(kind=d.kind, **{f: getattr(d, f) for f in _layer_fields(d.kind)}))
    return Architecture(hidden_size=config.hidden_size, layers=tuple(layers))


def reachable_topk(config: HybridConfig, num_experts: int) -> int:
    """Most experts a token can be routed to among ``num_experts`` kept ones: those of the
    ``moe_router_group_topk`` groups it may use."""
    return config.moe_router_group_topk * (num_experts // config.moe_router_num_groups)


def homogeneous(config: HybridConfig, *, hidden: int | None = None, ffn: int | None = None,
                attn_heads: int | None = None, mamba_heads: int | None = None, mamba_head_dim: int | None = None,
                moe_experts: int | None = None, moe_ffn: int | None = None, moe_shared_ffn: int | None = None,
                moe_topk: int | None = None, drop_layers: tuple[int, ...] | list[int] = ()) -> Architecture:  # fmt: skip
    """One size per axis for every layer of its type (None = the parent's size). ``moe_topk`` None keeps
    the parent's top-k, lowered to what the kept experts allow (:func:`reachable_topk`)."""
    sizes = {"ffn": ffn, "attn_heads": attn_heads, "mamba_heads": mamba_heads, "mamba_head_dim": mamba_head_dim,
             "moe_experts": moe_experts, "moe_ffn": moe_ffn, "moe_shared_ffn": moe_shared_ffn}  # fmt: skip
    full = full_architecture(config)
    dropped = set(drop_layers)
    for i in dropped:
        if not isinstance(i, int) or not 0 <= i < config.num_layers:
            raise ConfigError(f"cannot drop layer {i!r}: the parent has layers 0..{config.num_layers - 1}")
    layers = []
    for i, layer in enumerate(full.layers):
        kw = {AXIS_FIELD[axis]: value for axis, value in sizes.items()
              if value is not None and AXIS_KIND[axis] == layer.kind}  # fmt: skip
        if layer.kind == MOE:
            experts = kw.get("num_moe_experts", layer.num_moe_experts)
            kw["moe_router_topk"] = moe_topk if moe_topk is not None else \
                min(layer.moe_router_topk, reachable_topk(config, experts))  # fmt: skip
        layers.append(replace(layer, keep=i not in dropped, **kw))
    arch = Architecture(hidden_size=config.hidden_size if hidden is None else hidden, layers=tuple(layers))
    validate_architecture(config, arch)
    return arch


def validate_architecture(config: HybridConfig, arch: Architecture) -> None:
    """Raise ConfigError (one line, naming the fix) unless ``arch`` is a feasible child of ``config``."""
    axes = axes_of(config)
    axes["hidden"].check_size(arch.hidden_size)
    if len(arch.layers) != config.num_layers:
        raise ConfigError(f"architecture has {len(arch.layers)} layers but the parent has {config.num_layers}")
    if not arch.kept_layers():
        raise ConfigError("the architecture drops every layer (an empty model); keep at least one layer")
    for i, layer in enumerate(arch.layers):
        if layer.kind != config.layer_types[i]:
            raise ConfigError(f"layer {i} is {config.layer_types[i]!r} in the parent, not {layer.kind!r}")
        where = f"layer {i}"
        for name, ax in layer_axes(config, i).items():
            ax.check_size(getattr(layer, AXIS_FIELD[name]), where)
        if layer.kind == MOE:
            experts, topk, groups = layer.num_moe_experts, layer.moe_router_topk, config.moe_router_num_groups
            if experts // groups < 2:
                raise ConfigError(f"{where}: moe_experts size {experts} leaves fewer than 2 experts in each of the "
                                  f"{groups} routing groups (a group is scored by its two best experts); keep at "
                                  f"least {2 * groups}")  # fmt: skip
            if isinstance(topk, bool) or not isinstance(topk, int) or not 0 < topk <= reachable_topk(config, experts):
                raise ConfigError(f"{where}: top-k {topk!r} is invalid with {experts} experts kept; a token can reach "
                                  f"{reachable_topk(config, experts)} of them, so pick 1..{reachable_topk(config, experts)}")  # fmt: skip


def hard_state(config: HybridConfig, arch: Architecture, device=None) -> ElasticState:
    """The hard prefix masks of ``arch`` (1 kept / 0 dropped) for ``model(tokens, elastic=...)``."""
    validate_architecture(config, arch)
    axes = axes_of(config)
    hidden = None if arch.hidden_size == config.hidden_size else axes["hidden"].mask(arch.hidden_size, device)
    masks = []
    for i, layer in enumerate(arch.layers):
        m = LayerMask(keep=1.0 if layer.keep else 0.0)
        for name, ax in layer_axes(config, i).items():
            size = getattr(layer, AXIS_FIELD[name])
            if size != ax.full:
                setattr(m, name, ax.mask(size, device))
        if layer.kind == MOE and layer.moe_router_topk != config.layer_dims(i).moe_router_topk:
            m.moe_topk = layer.moe_router_topk
        masks.append(m)
    return ElasticState(hidden=hidden, layers=masks)


def child_config(config: HybridConfig, arch: Architecture) -> HybridConfig:
    """The config of the sliced child: kept layers only, their sizes; per-layer lists only when the
    kept layers of a type differ in size (a heterogeneous child)."""
    validate_architecture(config, arch)
    kept = [arch.layers[i] for i in arch.kept_layers()]
    pattern = "".join(layer.kind for layer in kept)
    kinds = dict(AXIS_KIND, moe_router_topk=MOE)
    fields = dict(AXIS_FIELD, moe_router_topk="moe_router_topk")
    changes = {}
    for axis, field in fields.items():
        values = [getattr(layer, field) for layer in kept if layer.kind == kinds[axis]]
        if not values:
            changes[field], changes[f"{field}_per_layer"] = getattr(config, field), None
        elif len(set(values)) == 1:
            changes[field], changes[f"{field}_per_layer"] = values[0], None
        else:
            changes[field], changes[f"{field}_per_layer"] = max(values), values
    return replace(config, pattern=pattern, hidden_size=arch.hidden_size, **changes)


def layer_keep(config: HybridConfig, arch: Architecture, index: int) -> LayerKeep:
    """The parent indices layer ``index`` keeps in ``arch`` (slices where they are a prefix)."""
    layer = arch.layers[index]
    return LayerKeep(**{name: compact(ax.indices(getattr(layer, AXIS_FIELD[name])))
                        for name, ax in layer_axes(config, index).items()})  # fmt: skip


def child_name(arch: Architecture, name: str) -> str:
    """The name in the child of ``arch`` of the parent's parameter ``name`` (kept layers renumbered)."""
    if not name.startswith("layers."):
        return name
    _, old, rest = name.split(".", 2)
    return f"layers.{arch.kept_layers().index(int(old))}.{rest}"


def slice_plan(config: HybridConfig, arch: Architecture) -> dict[str, Take]:
    """Parent parameter name -> what the child of ``arch`` keeps of it: the embedding, final norm and
    output layer, and every parameter of every kept layer (parent layer numbers)."""
    validate_architecture(config, arch)
    hidden = compact(axes_of(config)["hidden"].indices(arch.hidden_size))
    plan = model_plan(config, hidden)
    for i in arch.kept_layers():
        layer = layer_plan(config, i, hidden, layer_keep(config, arch, i))
        plan.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return plan
