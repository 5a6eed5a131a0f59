"""Where every elastic axis lives inside the parameters: the one parameter layout and slice plan.

Three things, all plain data in, plain data out (no elastic objects; ``elastic/`` builds on this):

* the packed Mamba-2 layout (:class:`MambaLayout`): ``in_proj`` rows
  ``[z, x, B, C, dt] = [H*P, H*P, G*N, G*N, H]`` and conv1d channels ``[x, B, C] = [H*P, G*N, G*N]``,
  as named components with sizes and offsets; heads are head-major and the heads of one B/C group
  are contiguous;
* the tensor-parallel partition functions (:func:`shard_slice` and the per-kind shards built on it):
  rank ``r`` holds the ``r``-th contiguous chunk of every packed component, of the query and KV
  heads, of the FFN neurons and of the vocabulary; :func:`component_layout` names those pieces for
  layout-independent checkpoints and :func:`shard_pieces` finds a rank's part in the global tensor (what
  a rank reads of a parent's files);
* the slice plan (:func:`layer_plan`, :func:`model_plan`): parameter name -> the rows and columns a
  layer keeps, given the kept hidden channels, FFN neurons, attention heads, Mamba heads and head
  channels. Extraction copies with it, view children take views with it, and a permutation is the
  same plan with full-size orders (index ``k`` of a plan = the parent index that lands at ``k``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from megatron_elastic.model.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig

Index = torch.Tensor | slice
"""Positions along one axis: a (long) index tensor, or a slice where they are one contiguous range."""
ALL = slice(None)
"""The whole axis."""

# ----------------------------------------------------------------------------- indices


def is_all(idx: Index) -> bool:
    """Whether ``idx`` is :data:`ALL` (an index tensor never is)."""
    return isinstance(idx, slice) and idx == ALL


def as_index(idx: Index, n: int) -> torch.Tensor:
    """``idx`` on an axis of size ``n`` as a long index tensor."""
    if isinstance(idx, slice):
        return torch.arange(n)[idx]
    return idx.to(torch.long)


def compact(idx: Index) -> Index:
    """``idx`` as a slice when it is one ascending contiguous range, else unchanged."""
    if isinstance(idx, slice) or idx.numel() == 0:
        return idx
    first = int(idx[0])
    if idx.numel() == 1 or bool((idx[1:] - idx[:-1] == 1).all()):
        return slice(first, first + idx.numel())
    return idx


def take(t: torch.Tensor, idx: Index, dim: int) -> torch.Tensor:
    """``t`` at positions ``idx`` of dimension ``dim``: a view for a slice, a gathered copy for a tensor."""
    if isinstance(idx, slice):
        if is_all(idx):
            return t
        start, stop, step = idx.indices(t.shape[dim])
        assert step == 1, idx
        return t.narrow(dim, start, stop - start)
    return t.index_select(dim, idx.to(t.device))


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a head-major projection for the given heads: heads x head_dim blocks."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def mamba_channels(heads: torch.Tensor, chans: torch.Tensor, head_dim: int) -> torch.Tensor:
    """d_inner indices (head-major, like x and z) of the kept (head, channel) pairs."""
    return (heads[:, None] * head_dim + chans[None, :]).reshape(-1)


# ----------------------------------------------------------------------------- packed Mamba layout


@dataclass(frozen=True)
class Component:
    """One named block of a packed axis: positions ``offset .. offset + size - 1``."""

    name: str
    offset: int
    size: int

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


def _packed(parts: list[tuple[str, int]]) -> tuple[Component, ...]:
    out, offset = [], 0
    for name, size in parts:
        out.append(Component(name, offset, size))
        offset += size
    return tuple(out)


@dataclass(frozen=True)
class MambaLayout:
    """The packed rows of one Mamba-2 layer (global sizes: H heads of P channels, G groups, state N)."""

    num_heads: int
    head_dim: int
    num_groups: int
    state_dim: int

    @classmethod
    def of(cls, config: HybridConfig, layer: int) -> MambaLayout:
        d = config.layer_dims(layer)
        return cls(num_heads=d.mamba_num_heads, head_dim=d.mamba_head_dim, num_groups=d.mamba_num_groups,
                   state_dim=d.mamba_state_dim)  # fmt: skip

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def group_state(self) -> int:
        """G*N: the rows of B (and of C)."""
        return self.num_groups * self.state_dim

    @property
    def in_proj(self) -> tuple[Component, ...]:
        """in_proj -> [z, x, B, C, dt] = [H*P, H*P, G*N, G*N, H] rows."""
        di, gn = self.d_inner, self.group_state
        return _packed([("z", di), ("x", di), ("B", gn), ("C", gn), ("dt", self.num_heads)])

    @property
    def conv(self) -> tuple[Component, ...]:
        """conv1d over [x, B, C] = [H*P, G*N, G*N] channels (weight (conv_dim, 1, kernel))."""
        di, gn = self.d_inner, self.group_state
        return _packed([("x", di), ("B", gn), ("C", gn)])

    def component(self, name: str, packed: str = "in_proj") -> Component:
        """The component ``name`` of ``in_proj`` (or of ``conv``)."""
        return next(c for c in getattr(self, packed) if c.name == name)

    def group_heads(self, group: int) -> torch.Tensor:
        """The heads that read B/C group ``group`` (contiguous: H/G per group)."""
        per = self.num_heads // self.num_groups
        return torch.arange(group * per, (group + 1) * per)

    def group_rows(self, group: int) -> torch.Tensor:
        """The d_inner rows (of z, x, the gated norm and out_proj's columns) of group ``group``'s heads."""
        return head_rows(self.group_heads(group), self.head_dim)

    def in_proj_rows(self, channels: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """in_proj rows for the d_inner ``channels`` and the ``heads`` kept (B and C are never trimmed)."""
        z, x, B, C, dt = self.in_proj
        bc = torch.arange(B.offset, C.offset + C.size)
        return torch.cat([z.offset + channels, x.offset + channels, bc, dt.offset + heads])

    def conv_rows(self, channels: torch.Tensor) -> torch.Tensor:
        """conv1d channels for the d_inner ``channels`` kept (B and C are never trimmed)."""
        x, B, C = self.conv
        return torch.cat([x.offset + channels, torch.arange(B.offset, C.offset + C.size)])


# ----------------------------------------------------------------------------- tensor-parallel partition


def shard_slice(n: int, tp_size: int, tp_rank: int) -> slice:
    """The one partition function: rank ``tp_rank``'s contiguous chunk of ``n`` items."""
    assert n % tp_size == 0, f"{n} items do not split over {tp_size} ranks"
    size = n // tp_size
    return slice(tp_rank * size, (tp_rank + 1) * size)


def shard_index(n: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """:func:`shard_slice` as an index tensor (FFN neurons, vocabulary rows, heads)."""
    s = shard_slice(n, tp_size, tp_rank)
    return torch.arange(s.start, s.stop)


def packed_shard_rows(parts: tuple[Component, ...], tp_size: int, tp_rank: int) -> torch.Tensor:
    """Global rows of a packed tensor that rank ``tp_rank`` holds: its chunk of every component,
    components in their packed order."""
    return torch.cat([c.offset + shard_index(c.size, tp_size, tp_rank) for c in parts])


@dataclass(frozen=True)
class MambaShard:
    """What one TP rank holds of a Mamba-2 layer: whole B/C groups and their heads (global indices)."""

    heads: torch.Tensor
    """(H/tp,) heads: dt_bias / A_log / D and the dt rows."""
    channels: torch.Tensor
    """(H*P/tp,) d_inner channels of those heads: the gated norm, out_proj's columns."""
    in_proj_rows: torch.Tensor
    """[z_r, x_r, B_r, C_r, dt_r]: rank r's chunk of each packed component."""
    conv_rows: torch.Tensor
    """[x_r, B_r, C_r]."""


def mamba_shard(layout: MambaLayout, tp_size: int, tp_rank: int) -> MambaShard:
    """Rank ``tp_rank``'s part of a Mamba-2 layer: groups ``r*G/tp .. (r+1)*G/tp - 1`` and their heads."""
    return MambaShard(heads=shard_index(layout.num_heads, tp_size, tp_rank),
                      channels=shard_index(layout.d_inner, tp_size, tp_rank),
                      in_proj_rows=packed_shard_rows(layout.in_proj, tp_size, tp_rank),
                      conv_rows=packed_shard_rows(layout.conv, tp_size, tp_rank))  # fmt: skip


def attention_shard(num_heads: int, num_kv_heads: int, head_dim: int, tp_size: int, tp_rank: int):
    """(q rows, k/v rows) rank ``tp_rank`` holds: its KV heads and the query heads that read them
    (GQA: query head j reads KV head j // (heads / kv_heads), so both are the rank's contiguous chunk)."""
    return shard_index(num_heads * head_dim, tp_size, tp_rank), shard_index(num_kv_heads * head_dim, tp_size, tp_rank)


@dataclass(frozen=True)
class TPComponent:
    """One layout-independent piece of a parameter (see :func:`component_layout`)."""

    key: str
    """Name of the global tensor this piece belongs to (the same at every TP degree)."""
    local_slice: tuple[slice, ...]
    """``local_param[local_slice]`` is this rank's piece of the global tensor ``key``."""
    shard_axis: int | None
    """Axis the global tensor is split along over the TP ranks, in rank order; None = replicated."""


_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_COLUMN = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "up_proj.weight", "up_proj.bias", "A_log", "D",
           "dt_bias", "norm.weight")  # fmt: skip
_ROW = ("out_proj.weight", "o_proj.weight", "down_proj.weight")
_REPLICATED = ("out_proj.bias", "down_proj.bias")


def param_partition(config: HybridConfig, name: str) -> tuple[tuple[Component, ...] | None, int | None]:
    """(packed components along axis 0 or None, TP shard axis or None = replicated) of parameter ``name``."""
    if name in ("embedding.weight", "output_layer.weight"):  # vocabulary rows
        return None, 0
    if name == "final_norm.weight":
        return None, None
    m = _LAYER.match(name)
    if m is None:
        raise KeyError(f"no tensor-parallel layout for parameter {name!r}")
    layer, rest = int(m.group(1)), m.group(2)
    if rest == "norm.weight":  # the block's pre-norm
        return None, None
    if not rest.startswith("mixer."):
        raise KeyError(f"no tensor-parallel layout for parameter {name!r}")
    rest = rest[len("mixer."):]
    if rest in ("in_proj.weight", "in_proj.bias"):
        return MambaLayout.of(config, layer).in_proj, 0
    if rest in ("conv1d.weight", "conv1d.bias"):
        return MambaLayout.of(config, layer).conv, 0
    if rest in _COLUMN:
        return None, 0
    if rest in _ROW:
        return None, 1
    if rest in _REPLICATED:
        return None, None
    raise KeyError(f"no tensor-parallel layout for parameter {name!r}")


def component_layout(config: HybridConfig, name: str, ndim: int, tp_size: int) -> list[TPComponent]:
    """The components of parameter ``name`` (``ndim`` dims) in a model split over ``tp_size`` ranks.
    At ``tp_size=1`` the slices are the components' places in the global tensor."""
    parts, axis = param_partition(config, name)
    full = (slice(None),) * ndim
    if parts is None:
        return [TPComponent(name, full, axis)]
    out, offset = [], 0
    for part in parts:
        local = part.size // tp_size
        out.append(TPComponent(f"{name}.{part.name}", (slice(offset, offset + local),) + full[1:], 0))
        offset += local
    return out


def shard_pieces(config: HybridConfig, name: str, shape: tuple[int, ...], tp_size: int,
                 tp_rank: int) -> list[tuple[slice, ...]]:  # fmt: skip
    """Rank ``tp_rank``'s part of the global parameter ``name`` (of ``shape``) in a ``tp_size``-way split, as
    blocks of the global tensor: ``torch.cat([full[p] for p in pieces])`` (along dim 0, in this order) is the
    rank's local tensor. One block unless the tensor is packed (then the rank's chunk of every component)."""
    pieces = []
    for c in component_layout(config, name, len(shape), 1):
        block = list(c.local_slice)
        if c.shard_axis is not None:
            start, stop, _ = block[c.shard_axis].indices(shape[c.shard_axis])
            s = shard_slice(stop - start, tp_size, tp_rank)
            block[c.shard_axis] = slice(start + s.start, start + s.stop)
        pieces.append(tuple(block))
    return pieces


# ----------------------------------------------------------------------------- slice plan


@dataclass(frozen=True)
class Take:
    """What one parameter keeps: ``param[rows][:, cols]`` (``cols`` only for matrices); for a stacked
    ``(experts, out, in)`` tensor (``experts`` not None) ``param[experts][:, rows][:, :, cols]``."""

    rows: Index = field(default_factory=lambda: ALL)
    cols: Index = field(default_factory=lambda: ALL)
    experts: Index | None = None
    """Stacked expert tensors only: the experts kept (dimension 0; ``rows`` and ``cols`` are then 1 and 2)."""

    @property
    def dims(self) -> tuple[tuple[Index, int], ...]:
        """(positions, dimension) of every cut, in the order :meth:`apply` takes them."""
        if self.experts is None:
            return ((self.rows, 0), (self.cols, 1))
        return ((self.experts, 0), (self.rows, 1), (self.cols, 2))

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` cut to the plan: views where all are slices, else gathered copies."""
        out = t
        for idx, dim in self.dims:
            if not is_all(idx):
                out = take(out, idx, dim)
        return out


@dataclass(frozen=True)
class LayerKeep:
    """What a layer keeps, as parent indices in the order they take (ALL = the whole axis, in order).
    Only the fields of the layer's kind are read."""

    ffn: Index = field(default_factory=lambda: ALL)
    """MLP: intermediate neurons."""
    attn_heads: Index = field(default_factory=lambda: ALL)
    """Attention: query heads (each stays with its KV group)."""
    kv_heads: Index = field(default_factory=lambda: ALL)
    """Attention: KV heads (groups)."""
    mamba_heads: Index = field(default_factory=lambda: ALL)
    """Mamba: heads (each stays inside its B/C group)."""
    mamba_head_dim: Index = field(default_factory=lambda: ALL)
    """Mamba: channels kept inside every head."""
    moe_experts: Index = field(default_factory=lambda: ALL)
    """MoE: routed experts (each stays inside its routing group), with their router rows and bias."""
    moe_ffn: Index = field(default_factory=lambda: ALL)
    """MoE: intermediate neurons of every routed expert."""
    moe_shared_ffn: Index = field(default_factory=lambda: ALL)
    """MoE: intermediate neurons of the shared expert."""


def _rows(idx: Index, head_dim: int, n_heads: int) -> Index:
    return ALL if is_all(idx) else compact(head_rows(as_index(idx, n_heads), head_dim))


def _mlp_plan(config: HybridConfig, prefix: str, neurons: Index, hidden: Index) -> dict[str, Take]:
    """An MLP's parameters (an MLP layer's mixer, an MoE layer's shared expert) under ``prefix``."""
    plan = {f"{prefix}up_proj.weight": Take(neurons, hidden), f"{prefix}down_proj.weight": Take(hidden, neurons)}
    if config.mlp_bias:
        plan[f"{prefix}up_proj.bias"] = Take(neurons)
        plan[f"{prefix}down_proj.bias"] = Take(hidden)
    return plan


def layer_plan(config: HybridConfig, layer: int, hidden: Index = ALL, keep: LayerKeep | None = None) -> dict[str, Take]:
    """Parameter name (relative to ``layers.{layer}.``) -> :class:`Take`, for every parameter of the layer."""
    d = config.layer_dims(layer)
    keep = LayerKeep() if keep is None else keep
    hidden = compact(hidden)
    plan = {"norm.weight": Take(hidden)}
    if d.kind == MLP:
        plan.update(_mlp_plan(config, "mixer.", compact(keep.ffn), hidden))
    elif d.kind == ATTENTION:
        q = _rows(keep.attn_heads, config.head_dim, d.num_attention_heads)
        kv = _rows(keep.kv_heads, config.head_dim, config.num_query_groups)
        plan["mixer.q_proj.weight"] = Take(q, hidden)
        plan["mixer.k_proj.weight"] = Take(kv, hidden)
        plan["mixer.v_proj.weight"] = Take(kv, hidden)
        plan["mixer.o_proj.weight"] = Take(hidden, q)
    elif d.kind == MOE:
        e, f, sh = compact(keep.moe_experts), compact(keep.moe_ffn), compact(keep.moe_shared_ffn)
        plan["mixer.gate.weight"] = Take(e, hidden)
        plan["mixer.gate.e_score_correction_bias"] = Take(e)
        inner = ALL if config.moe_latent_size else hidden  # the experts read the latent space, else the residual
        plan["mixer.experts.up_proj"] = Take(f, inner, experts=e)
        plan["mixer.experts.down_proj"] = Take(inner, f, experts=e)
        plan.update(_mlp_plan(config, "mixer.shared_experts.", sh, hidden))
        if config.moe_latent_size:
            plan["mixer.fc1_latent_proj.weight"] = Take(ALL, hidden)
            plan["mixer.fc2_latent_proj.weight"] = Take(hidden)
            if config.mlp_bias:
                plan["mixer.fc1_latent_proj.bias"] = Take(ALL)
                plan["mixer.fc2_latent_proj.bias"] = Take(hidden)
    else:
        assert d.kind == MAMBA, d.kind
        lay = MambaLayout.of(config, layer)
        if is_all(keep.mamba_heads) and is_all(keep.mamba_head_dim):
            heads = ch = in_rows = conv_rows = ALL
        else:
            heads = as_index(keep.mamba_heads, lay.num_heads)
            chans = mamba_channels(heads, as_index(keep.mamba_head_dim, lay.head_dim), lay.head_dim)
            in_rows, conv_rows = compact(lay.in_proj_rows(chans, heads)), compact(lay.conv_rows(chans))
            heads, ch = compact(heads), compact(chans)
        plan["mixer.in_proj.weight"] = Take(in_rows, hidden)
        plan["mixer.conv1d.weight"] = Take(conv_rows)
        for name in ("dt_bias", "A_log", "D"):
            plan[f"mixer.{name}"] = Take(heads)
        plan["mixer.norm.weight"] = Take(ch)
        plan["mixer.out_proj.weight"] = Take(hidden, ch)
        if config.mamba_proj_bias:
            plan["mixer.in_proj.bias"] = Take(in_rows)
            plan["mixer.out_proj.bias"] = Take(hidden)
        if config.mamba_conv_bias:
            plan["mixer.conv1d.bias"] = Take(conv_rows)
    return plan


def model_plan(config: HybridConfig, hidden: Index = ALL) -> dict[str, Take]:
    """The parameters outside the layers (embedding, final norm, untied output layer) -> :class:`Take`."""
    hidden = compact(hidden)
    plan = {"embedding.weight": Take(ALL, hidden), "final_norm.weight": Take(hidden)}
    if not config.tie_embeddings:
        plan["output_layer.weight"] = Take(ALL, hidden)
    return plan
