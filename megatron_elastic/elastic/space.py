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
depth              a dropped layer is the identity
=================  ==============================================================================

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
from megatron_elastic.model.config import ATTENTION, MAMBA, MLP, HybridConfig
from megatron_elastic.model.elastic_state import ElasticState, LayerMask
from megatron_elastic.model.layout import LayerKeep, Take, compact, layer_plan, model_plan

WIDTH_AXES = ("hidden", "ffn", "attn_heads", "mamba_heads", "mamba_head_dim")
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
        fields = {"kind", "keep", "ffn_hidden_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim"}
        layers = []
        for layer in data["layers"]:
            if not isinstance(layer, dict) or "kind" not in layer or not set(layer) <= fields:
                raise bad(f"layer {shown(layer)} must be an object with kind and sizes among {sorted(fields)}")
            if layer["kind"] not in (MAMBA, ATTENTION, MLP) or not isinstance(layer.get("keep", True), bool):
                raise bad(f"layer {shown(layer)} has a kind other than M, * or -, or a keep that is not true/false")
            layers.append(LayerArch(**{k: v if k in ("kind", "keep") else size(v, k) for k, v in layer.items()}))
        return cls(hidden_size=size(data["hidden_size"], "hidden_size", optional=False), layers=tuple(layers))


def axes_of(config: HybridConfig) -> dict[str, Axis]:
    """The parent's axes (no choices): full sizes and group structure."""
    c = config
    return {
        "hidden": Axis("hidden", c.hidden_size),
        "ffn": Axis("ffn", c.ffn_hidden_size),
        "attn_heads": Axis("attn_heads", c.num_attention_heads, groups=c.num_query_groups),
        "mamba_heads": Axis("mamba_heads", c.mamba_num_heads, groups=c.mamba_num_groups),
        "mamba_head_dim": Axis("mamba_head_dim", c.mamba_head_dim),
        "depth": Axis("depth", c.num_layers),
    }


def layer_axes(config: HybridConfig, index: int) -> dict[str, Axis]:
    """The axes of one layer (per-layer full sizes of a heterogeneous parent)."""
    d = config.layer_dims(index)
    if d.kind == MLP:
        return {"ffn": Axis("ffn", d.ffn_hidden_size)}
    if d.kind == ATTENTION:
        return {"attn_heads": Axis("attn_heads", d.num_attention_heads, groups=config.num_query_groups)}
    return {
        "mamba_heads": Axis("mamba_heads", d.mamba_num_heads, groups=config.mamba_num_groups),
        "mamba_head_dim": Axis("mamba_head_dim", d.mamba_head_dim),
    }


def full_architecture(config: HybridConfig) -> Architecture:
    layers = []
    for i in range(config.num_layers):
        d = config.layer_dims(i)
        layers.append(LayerArch(
            kind=d.kind,
            ffn_hidden_size=d.ffn_hidden_size if d.kind == MLP else None,
            num_attention_heads=d.num_attention_heads if d.kind == ATTENTION else None,
            mamba_num_heads=d.mamba_num_heads if d.kind == MAMBA else None,
            mamba_head_dim=d.mamba_head_dim if d.kind == MAMBA else None,
        ))  # fmt: skip
    return Architecture(hidden_size=config.hidden_size, layers=tuple(layers))


def homogeneous(config: HybridConfig, *, hidden: int | None = None, ffn: int | None = None,
                attn_heads: int | None = None, mamba_heads: int | None = None, mamba_head_dim: int | None = None,
                drop_layers: tuple[int, ...] | list[int] = ()) -> Architecture:  # fmt: skip
    """One size per axis for every layer of its type (None = the parent's size)."""
    def pick(value, default):
        return default if value is None else value

    full = full_architecture(config)
    dropped = set(drop_layers)
    for i in dropped:
        if not isinstance(i, int) or not 0 <= i < config.num_layers:
            raise ConfigError(f"cannot drop layer {i!r}: the parent has layers 0..{config.num_layers - 1}")
    layers = []
    for i, layer in enumerate(full.layers):
        layers.append(replace(
            layer,
            keep=i not in dropped,
            ffn_hidden_size=pick(ffn, layer.ffn_hidden_size) if layer.kind == MLP else None,
            num_attention_heads=pick(attn_heads, layer.num_attention_heads) if layer.kind == ATTENTION else None,
            mamba_num_heads=pick(mamba_heads, layer.mamba_num_heads) if layer.kind == MAMBA else None,
            mamba_head_dim=pick(mamba_head_dim, layer.mamba_head_dim) if layer.kind == MAMBA else None,
        ))  # fmt: skip
    arch = Architecture(hidden_size=pick(hidden, config.hidden_size), layers=tuple(layers))
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
        ax = layer_axes(config, i)
        where = f"layer {i}"
        if layer.kind == MLP:
            ax["ffn"].check_size(layer.ffn_hidden_size, where)
        elif layer.kind == ATTENTION:
            ax["attn_heads"].check_size(layer.num_attention_heads, where)
        else:
            ax["mamba_heads"].check_size(layer.mamba_num_heads, where)
            ax["mamba_head_dim"].check_size(layer.mamba_head_dim, where)


def hard_state(config: HybridConfig, arch: Architecture, device=None) -> ElasticState:
    """The hard prefix masks of ``arch`` (1 kept / 0 dropped) for ``model(tokens, elastic=...)``."""
    validate_architecture(config, arch)
    axes = axes_of(config)
    hidden = None if arch.hidden_size == config.hidden_size else axes["hidden"].mask(arch.hidden_size, device)
    masks = []
    for i, layer in enumerate(arch.layers):
        ax = layer_axes(config, i)
        m = LayerMask(keep=1.0 if layer.keep else 0.0)
        if layer.kind == MLP and layer.ffn_hidden_size != ax["ffn"].full:
            m.ffn = ax["ffn"].mask(layer.ffn_hidden_size, device)
        elif layer.kind == ATTENTION and layer.num_attention_heads != ax["attn_heads"].full:
            m.attn_heads = ax["attn_heads"].mask(layer.num_attention_heads, device)
        elif layer.kind == MAMBA:
            if layer.mamba_num_heads != ax["mamba_heads"].full:
                m.mamba_heads = ax["mamba_heads"].mask(layer.mamba_num_heads, device)
            if layer.mamba_head_dim != ax["mamba_head_dim"].full:
                m.mamba_head_dim = ax["mamba_head_dim"].mask(layer.mamba_head_dim, device)
        masks.append(m)
    return ElasticState(hidden=hidden, layers=masks)


def child_config(config: HybridConfig, arch: Architecture) -> HybridConfig:
    """The config of the sliced child: kept layers only, their sizes; per-layer lists only when the
    kept layers of a type differ in size (a heterogeneous child)."""
    validate_architecture(config, arch)
    kept = [arch.layers[i] for i in arch.kept_layers()]
    pattern = "".join(layer.kind for layer in kept)

    def sizes(kind: str, attr: str, default: int):
        values = [getattr(layer, attr) for layer in kept if layer.kind == kind]
        if not values:
            return default, None
        return (values[0], None) if len(set(values)) == 1 else (max(values), values)

    ffn, ffn_list = sizes(MLP, "ffn_hidden_size", config.ffn_hidden_size)
    heads, heads_list = sizes(ATTENTION, "num_attention_heads", config.num_attention_heads)
    mheads, mheads_list = sizes(MAMBA, "mamba_num_heads", config.mamba_num_heads)
    mdim, mdim_list = sizes(MAMBA, "mamba_head_dim", config.mamba_head_dim)
    return replace(
        config,
        pattern=pattern,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        mamba_num_heads=mheads,
        mamba_head_dim=mdim,
        ffn_hidden_size_per_layer=ffn_list,
        num_attention_heads_per_layer=heads_list,
        mamba_num_heads_per_layer=mheads_list,
        mamba_head_dim_per_layer=mdim_list,
    )


def layer_keep(config: HybridConfig, arch: Architecture, index: int) -> LayerKeep:
    """The parent indices layer ``index`` keeps in ``arch`` (slices where they are a prefix)."""
    layer, ax = arch.layers[index], layer_axes(config, index)
    if layer.kind == MLP:
        return LayerKeep(ffn=compact(ax["ffn"].indices(layer.ffn_hidden_size)))
    if layer.kind == ATTENTION:
        return LayerKeep(attn_heads=compact(ax["attn_heads"].indices(layer.num_attention_heads)))
    return LayerKeep(mamba_heads=compact(ax["mamba_heads"].indices(layer.mamba_num_heads)),
                     mamba_head_dim=compact(ax["mamba_head_dim"].indices(layer.mamba_head_dim)))  # fmt: skip


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
