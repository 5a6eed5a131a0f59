"""Tensor parallelism: the single-device :class:`HybridLM` split over a tensor-parallel group.

:func:`apply_tensor_parallel` runs after the single-device build and swaps, in place, every linear
and embedding for a megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` /
``VocabParallelEmbedding`` holding this rank's shard of the very same weights (copied in, nothing
re-initialised), and every mixer for its tensor-parallel variant (one mapping, :data:`TP_MIXERS`):

=============  ===========================================================================================
layer          how it is split over ``tp`` ranks (rank ``r`` holds the ``r``-th contiguous chunk)
=============  ===========================================================================================
embedding      vocabulary rows (``VocabParallelEmbedding``)
output layer   vocabulary rows; the model returns vocabulary-sharded logits ``(b, L, V / tp)``
Mamba-2        by B/C groups and the heads inside them: ``in_proj`` per packed component
               ``[z, x, B, C, dt] = [d_inner, d_inner, G*N, G*N, H]``, each cut into ``tp`` chunks, so
               rank ``r`` computes ``[z_r, x_r, B_r, C_r, dt_r]``; conv1d over ``[x_r, B_r, C_r]``;
               ``A_log`` / ``D`` / ``dt_bias`` / gated norm by local heads; ``out_proj`` by input columns
attention      by KV groups and the query heads that read them (GQA): q/k/v by output rows, o by columns
MLP            by intermediate neurons: up by rows, down by columns
norms          replicated (the residual stream is whole on every rank)
=============  ===========================================================================================

Heads are head-major and the heads of one group are contiguous, so "chunk ``r`` of the heads" is
"the heads of groups ``r*G/tp .. (r+1)*G/tp - 1``" and every group's heads stay on one rank.

Elastic masks stay in the *global* index space: :class:`ElasticState` is the same object on every
rank, and each mixer cuts its local mask out of it with :func:`~megatron_elastic.model.layout.shard_slice`,
the partition function its weights were cut with (the packed layout and every partition function live
in :mod:`megatron_elastic.model.layout`). A prefix mask therefore means the same parent channels at any
TP degree, so what is extracted does not depend on the layout used in training. A mask that carries gradients
(soft masks from the router) gets, on every rank, the gradient of the whole global mask.

Sequence parallelism (``sequence_parallel=True``) also splits the residual stream between mixers
by positions; see the section below. :data:`LINEAR_SPECS` picks megatron-core or Transformer Engine
linears (FP8: :mod:`megatron_elastic.parallel.fp8`).

:func:`tp_component_slices`, :func:`merge_tp_state_dicts` and :func:`split_tp_state_dict` describe and
move between layouts with the same partition (checkpoints, resharding), through
:func:`~megatron_elastic.model.layout.component_layout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from megatron_elastic.model.elastic_state import LayerMask
from megatron_elastic.model.hybrid import HybridBlock, HybridLM
from megatron_elastic.model.layout import (
    MambaLayout, TPComponent, attention_shard, component_layout, mamba_shard, shard_index, shard_pieces, shard_slice,
)  # fmt: skip
from megatron_elastic.model.layers import MLP as MLPMixer
from megatron_elastic.model.layers import Attention, GatedGroupRMSNorm, Mamba2Mixer, RMSNorm

# ----------------------------------------------------------------------------- divisibility


def _elastic_sizes(elastic_choices, config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Axis -> concrete sizes, from an ``ElasticSpace``, the run config's elastic section (resolved
    against ``config`` by ``ElasticSpace.from_config``, as the elastic trainer resolves it) or a
    mapping axis -> sizes."""
    from megatron_elastic.config.schema import ElasticConfig
    from megatron_elastic.elastic.search_space import ElasticSpace

    if elastic_choices is None:
        return {}
    if isinstance(elastic_choices, Mapping):
        return {name: tuple(sizes) for name, sizes in elastic_choices.items()}
    if isinstance(elastic_choices, ElasticConfig):
        with warnings.catch_warnings():  # merged duplicate sizes are reported where the run builds its space
            warnings.simplefilter("ignore")
            elastic_choices = ElasticSpace.from_config(config, elastic_choices)
    if not isinstance(elastic_choices, ElasticSpace):
        raise TypeError(f"elastic_choices must be an ElasticSpace, an ElasticConfig or a mapping axis -> sizes, "
                        f"not {type(elastic_choices).__name__}")  # fmt: skip
    return {name: elastic_choices.choices(name) for name in elastic_choices.axes}


def check_tp_divisibility(config: HybridConfig, tp_size: int, elastic_choices=None) -> None:
    """Raise ConfigError (one line naming the fix) unless ``config`` splits over ``tp_size`` ranks.

    The model needs: vocabulary, every FFN size, KV heads (``num_query_groups``) and Mamba groups
    divisible by ``tp_size`` (query heads and Mamba heads then follow, being whole groups).
    Elastic choices (``ElasticSpace``, the elastic config section, or ``{axis: sizes}``) need FFN
    sizes divisible by ``tp_size``
    so that every child can itself run at this TP degree; head choices are multiples of the group
    counts already, hence of ``tp_size``. Hidden and head-dim choices are not split.
    """
    tp = tp_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"parallel.tp={tp!r} is invalid; it must be a positive integer")
    if tp == 1:
        return
    c = config
    if MOE in c.layer_types:
        raise ConfigError(f"parallel.tp={tp} with mixture-of-experts ('E') layers is not supported yet (experts are "
                          "not split); use parallel.tp=1 with data or pipeline parallelism")  # fmt: skip
    if c.vocab_size % tp:
        padded = -(-c.vocab_size // tp) * tp
        raise ConfigError(f"model.vocab_size={c.vocab_size} is not divisible by parallel.tp={tp}; "
                          f"pad the vocabulary to a multiple of {tp} (e.g. {padded}) or lower parallel.tp")  # fmt: skip
    if c.num_query_groups % tp and ATTENTION in c.layer_types:
        raise ConfigError(f"model.num_query_groups={c.num_query_groups} (KV heads) is not divisible by parallel.tp={tp}; "
                          "attention is split by KV groups: use a tp that divides the KV heads")  # fmt: skip
    if c.mamba_num_groups % tp and MAMBA in c.layer_types:
        raise ConfigError(f"model.mamba_num_groups={c.mamba_num_groups} is not divisible by parallel.tp={tp}; "
                          "Mamba layers are split by B/C groups: use a tp that divides the group count")  # fmt: skip
    for i, kind in enumerate(c.layer_types):
        if kind == MLP and c.layer_dims(i).ffn_hidden_size % tp:
            raise ConfigError(f"layer {i}: FFN size {c.layer_dims(i).ffn_hidden_size} is not divisible by parallel.tp={tp}; "
                              f"use FFN sizes that are multiples of {tp}")  # fmt: skip
    choices = _elastic_sizes(elastic_choices, config)
    units = {"ffn": tp, "attn_heads": tp, "mamba_heads": tp}
    for axis, unit in units.items():
        bad = [k for k in choices.get(axis, ()) if k % unit]
        if bad:
            raise ConfigError(f"elastic.{axis} size {bad[0]} is not divisible by parallel.tp={tp}; every elastic "
                              f"{axis} size must be a multiple of {unit} (e.g. elastic.multiple_of={unit})")  # fmt: skip


def check_fp8_divisibility(config: HybridConfig, tp_size: int = 1, elastic_choices=None) -> None:
    """Raise ConfigError (one line naming the fix) unless every FP8 GEMM dimension is a multiple of 16:
    the model's local GEMM shapes at ``tp_size`` and every elastic choice."""
    from megatron_elastic.parallel.fp8 import FP8_MULTIPLE

    c, tp = config, tp_size
    if MOE in c.layer_types:
        raise ConfigError("parallel.fp8 with mixture-of-experts ('E') layers is not supported yet; "
                          "set parallel.fp8.enabled=false")  # fmt: skip
    dims = {"model.hidden_size": c.hidden_size}
    for i, kind in enumerate(c.layer_types):
        d = c.layer_dims(i)
        if kind == MLP:
            dims[f"layer {i}: FFN size / tp"] = d.ffn_hidden_size // tp
        elif kind == ATTENTION:
            dims[f"layer {i}: query width (heads x head_dim) / tp"] = d.num_attention_heads * c.head_dim // tp
            dims[f"layer {i}: key/value width (KV heads x head_dim) / tp"] = c.num_query_groups * c.head_dim // tp
        elif kind == MAMBA:
            dims[f"layer {i}: Mamba d_inner / tp"] = d.mamba_d_inner // tp
            dims[f"layer {i}: Mamba in_proj width / tp"] = d.mamba_in_proj_dim // tp
    for what, value in dims.items():
        if value % FP8_MULTIPLE:
            raise ConfigError(f"{what} = {value} is not a multiple of {FP8_MULTIPLE} as FP8 GEMMs need; "
                              f"resize the model or set parallel.fp8.enabled=false")  # fmt: skip
    # Every child must run FP8 too: the per-rank GEMM widths of every choice (and of every Mamba
    # heads x head-dim pair: in_proj packs [z, x, B, C, dt], so its width has an odd part per head).
    choices = _elastic_sizes(elastic_choices, config)
    if not choices:  # the parent's own widths were checked above
        return
    kinds = set(c.layer_types)
    G, N = c.mamba_num_groups, c.mamba_state_dim
    widths: list[tuple[str, str, int]] = [("hidden", f"size {k} gives a hidden width", k) for k in choices.get("hidden", ())]
    if MLP in kinds:
        widths += [("ffn", f"size {k} gives a per-rank FFN width", k // tp) for k in choices.get("ffn", ())]
    if ATTENTION in kinds:
        widths += [("attn_heads", f"size {k} gives a per-rank query width", k * c.head_dim // tp)
                   for k in choices.get("attn_heads", ())]  # fmt: skip
    if MAMBA in kinds:
        for k in choices.get("mamba_heads", (c.mamba_num_heads,)):
            for p in choices.get("mamba_head_dim", (c.mamba_head_dim,)):
                pair = f"size {k} with head dim {p} gives a per-rank Mamba"
                widths += [("mamba_heads", f"{pair} d_inner", k * p // tp),
                           ("mamba_heads", f"{pair} in_proj width", (2 * k * p + 2 * G * N + k) // tp)]  # fmt: skip
    for axis, what, width in widths:
        if width % FP8_MULTIPLE:
            fix = (f"set elastic.multiple_of={FP8_MULTIPLE * (tp if axis == 'ffn' else 1)}" if axis in ("hidden", "ffn") else
                   f"drop that elastic.{axis} choice or set parallel.fp8.enabled=false")  # fmt: skip
            raise ConfigError(f"elastic.{axis} {what} of {width} at parallel.tp={tp}, not a multiple of "
                              f"{FP8_MULTIPLE} as FP8 GEMMs need; {fix}")  # fmt: skip


# ----------------------------------------------------------------------------- layers


def _no_init(weight: torch.Tensor) -> None:
    """Weights are copied from the single-device model; megatron-core must not initialise them."""


def megatron_linear_factories(sequence_parallel: bool = False):
    """(column, row) builders of megatron-core's ColumnParallelLinear / RowParallelLinear, adapted to
    return only their output as ``nn.Linear`` does (so the reference mixers' forwards run unchanged):
    ``build(in_features, out_features, *, bias, tp_group, mp_config)``.

    Under sequence parallelism the mixer gathers the sequence itself (its backward reduce-scatters
    the input gradient), so the column layer does no gradient all-reduce, and the row layer is
    :class:`SequenceParallelRowLinear` (reduce-scatter over the sequence instead of all-reduce).
    """
    column_cls, row_cls = _megatron_classes()

    def column(in_features, out_features, *, bias, tp_group, mp_config):
        return column_cls(in_features, out_features, config=mp_config, init_method=_no_init, bias=bias,
                          gather_output=False, skip_bias_add=False, tp_group=tp_group,
                          disable_grad_reduce=sequence_parallel)  # fmt: skip

    def row(in_features, out_features, *, bias, tp_group, mp_config):
        if sequence_parallel:
            return SequenceParallelRowLinear(in_features, out_features, bias=bias, tp_group=tp_group,
                                             dtype=mp_config.params_dtype)  # fmt: skip
        return row_cls(in_features, out_features, config=mp_config, init_method=_no_init, bias=bias,
                       input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)  # fmt: skip

    return column, row


_CLASSES: list = []


def _megatron_classes():
    if not _CLASSES:  # one class per process, so isinstance checks agree
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        class MegatronColumnLinear(ColumnParallelLinear):
            def forward(self, x, weight=None):
                return super().forward(x, weight)[0]

        class MegatronRowLinear(RowParallelLinear):
            def forward(self, x):
                return super().forward(x)[0]

        _CLASSES.extend([MegatronColumnLinear, MegatronRowLinear])
    return _CLASSES[0], _CLASSES[1]


def _te_linear_factories(sequence_parallel: bool = False):
    from megatron_elastic.parallel.fp8 import te_linear_factories

    return te_linear_factories(sequence_parallel, reduce_scatter=reduce_scatter_sequence)


# The linear spec: which implementation builds the mixers' column / row parallel linears.
LINEAR_SPECS = {"megatron": megatron_linear_factories, "transformer_engine": _te_linear_factories}


# ----------------------------------------------------------------------------- sequence parallelism
# Activations are (b, L, d); under sequence parallelism the residual stream inside the blocks is
# split along L: rank r holds positions shard_slice(L, tp, r). Norms and residual adds are per
# token; each mixer gathers the whole sequence (its scan and attention need it) and its output
# projection reduce-scatters back to the rank's positions.


def _all_gather_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
    if dist.get_backend(group) == "nccl":  # one reduce-scatter; dim 0 must be the split dim
        inp = x.movedim(1, 0).contiguous()
        out = inp.new_empty((inp.shape[0] // size, *inp.shape[1:]))
        dist.reduce_scatter_tensor(out, inp, group=group)
        return out.movedim(0, 1).contiguous()
    total = x.contiguous().clone()  # gloo has no reduce-scatter: all-reduce and keep this rank's positions
    dist.all_reduce(total, group=group)
    return total[:, shard_slice(total.shape[1], size, rank)].contiguous()


def _seq_chunk(x: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    if x.shape[1] % size:
        raise ValueError(f"sequence parallelism needs the sequence length {x.shape[1]} to be a multiple of the "
                         f"tensor-parallel size {size}; pad or cut the sequences")  # fmt: skip
    return x[:, shard_slice(x.shape[1], size, rank)].contiguous()


class _ScatterSequence(torch.autograd.Function):
    """Replicated (b, L, d) -> this rank's positions; backward all-gathers (the result is replicated)."""

    @staticmethod
    def forward(ctx, x, group, size, rank):
        ctx.group, ctx.size = group, size
        return _seq_chunk(x, size, rank)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group, ctx.size), None, None, None


class _GatherSequence(torch.autograd.Function):
    """This rank's positions -> the whole sequence. ``partial_grad``: the consumer is tensor parallel
    and each rank's gradient is a partial sum (backward reduce-scatters); else the consumer is
    replicated and the gradient is whole on every rank (backward keeps this rank's positions)."""

    @staticmethod
    def forward(ctx, x, group, size, rank, partial_grad):
        ctx.group, ctx.size, ctx.rank, ctx.partial = group, size, rank, partial_grad
        return _all_gather_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return _reduce_scatter_seq(grad, ctx.group, ctx.size, ctx.rank), None, None, None, None
        return _seq_chunk(grad, ctx.size, ctx.rank), None, None, None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Partial sums over the whole sequence -> their total at this rank's positions; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group, size, rank):
        ctx.group, ctx.size = group, size
        return _reduce_scatter_seq(x, group, size, rank)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group, ctx.size), None, None, None


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums over the whole sequence -> their total at this rank's positions (autograd-aware)."""
    return _ReduceScatterSequence.apply(x, group, dist.get_world_size(group), dist.get_rank(group))


class SequenceParallelRowLinear(nn.Module):
    """Row-parallel linear for sequence parallelism: local product with this rank's input columns,
    reduce-scatter over the sequence, then the (replicated) bias on this rank's positions."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp_group, dtype: torch.dtype):
        super().__init__()
        self.group = tp_group
        self.size, self.rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.size, dtype=dtype))
        _mark_parallel(self.weight, 1)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = True  # gradient from this rank's positions only: summed over TP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_scatter_sequence(nn.functional.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


def allreduce_sequence_parallel_grads(model: nn.Module) -> None:
    """Sum over the tensor-parallel group the gradients of parameters that see only this rank's
    positions under sequence parallelism (``param.sequence_parallel``: block norms, row biases).
    megatron-core's ``finalize_model_grads`` does the same for a model wrapped in its DDP. Under that
    wrapper (``param.main_grad``: its fp32 buffer) the gradients are there."""
    tp = tp_context(model)
    if tp is None or not tp.sequence_parallel:
        return
    grads = [getattr(p, "main_grad", p.grad) for p in model.parameters() if getattr(p, "sequence_parallel", False)]
    grads = [g for g in grads if g is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=tp.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


class _LocalMask(torch.autograd.Function):
    """This rank's chunk of a replicated global mask. The backward all-gathers the chunks'
    gradients, so each rank holds the gradient of the whole global mask (as for any replicated
    input of the tensor-parallel region)."""

    @staticmethod
    def forward(ctx, mask, group, size, rank):
        ctx.group, ctx.size = group, size
        return mask[..., shard_slice(mask.shape[-1], size, rank)].clone()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(ctx.size)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=-1), None, None, None


@dataclass
class TPContext:
    """What the tensor-parallel layers of one model share: the group and how linears are built."""

    group: object
    size: int
    rank: int
    mp_config: object
    """megatron.core.ModelParallelConfig the megatron-core layers are built with."""
    linears: tuple
    """(column, row) builders of the mixers' linears (see :data:`LINEAR_SPECS`)."""
    fp8: object = None
    """The parallel.fp8 section (FP8Config) when the mixers' GEMMs run in FP8 (Transformer Engine), else None."""
    amax_group: object = None
    """Group the FP8 amax statistics are reduced over."""
    num_layers: int = 0
    sequence_parallel: bool = False

    def gather_sequence(self, x: torch.Tensor, *, partial_grad: bool = True) -> torch.Tensor:
        """Under sequence parallelism: this rank's positions -> the whole sequence (else ``x``)."""
        if not self.sequence_parallel:
            return x
        return _GatherSequence.apply(x, self.group, self.size, self.rank, partial_grad)

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return _ScatterSequence.apply(x, self.group, self.size, self.rank) if self.sequence_parallel else x

    def sum_partial_grads(self, t):
        """A replicated tensor used on this rank's positions only (hidden mask, depth scale under
        sequence parallelism): identity, with its gradient summed over the group (megatron-core's
        copy-to-region)."""
        if not self.sequence_parallel or not torch.is_tensor(t) or not t.requires_grad:
            return t
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(t, group=self.group)

    def precision(self, layer: int):
        """The context a mixer's forward runs in: FP8 for the inner layers when FP8 is on."""
        if self.fp8 is None or not self.fp8.layer_in_fp8(layer, self.num_layers):
            return contextlib.nullcontext()
        from megatron_elastic.parallel.fp8 import fp8_context

        return fp8_context(self.fp8_recipe, True, self.amax_group)

    @functools.cached_property
    def fp8_recipe(self):
        from megatron_elastic.parallel.fp8 import te_recipe

        return None if self.fp8 is None else te_recipe(self.fp8)

    def local_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None or self.size == 1:
            return mask
        if mask.requires_grad:
            return _LocalMask.apply(mask, self.group, self.size, self.rank)
        return mask[..., shard_slice(mask.shape[-1], self.size, self.rank)]

    def local_layer_mask(self, mask: LayerMask | None) -> LayerMask | None:
        if mask is None:
            return None
        # mamba_head_dim (channels of every head) is not split, but each rank uses it on its own heads
        # only: megatron-core's copy-to-region (identity; all-reduce of the gradient) sums the parts.
        head_dim = mask.mamba_head_dim
        if head_dim is not None and head_dim.requires_grad and self.size > 1:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            head_dim = copy_to_tensor_model_parallel_region(head_dim, group=self.group)
        return dataclasses.replace(mask, ffn=self.local_mask(mask.ffn), attn_heads=self.local_mask(mask.attn_heads),
                                   mamba_heads=self.local_mask(mask.mamba_heads), mamba_head_dim=head_dim)  # fmt: skip

    def column(self, ref: nn.Linear, rows: torch.Tensor) -> nn.Module:
        """Column-parallel copy of ``ref`` holding its output rows ``rows``."""
        layer = self.linears[0](ref.in_features, ref.out_features, bias=ref.bias is not None, tp_group=self.group,
                                mp_config=self.mp_config)  # fmt: skip
        _copy_param(layer.weight, ref.weight[rows], partition_dim=0)
        if ref.bias is not None:
            _copy_param(layer.bias, ref.bias[rows], partition_dim=None)  # megatron marks it already
        return layer

    def row(self, ref: nn.Linear, cols: torch.Tensor) -> nn.Module:
        """Row-parallel copy of ``ref`` holding its input columns ``cols``; the bias is replicated."""
        layer = self.linears[1](ref.in_features, ref.out_features, bias=ref.bias is not None, tp_group=self.group,
                                mp_config=self.mp_config)  # fmt: skip
        _copy_param(layer.weight, ref.weight[:, cols], partition_dim=1)
        if ref.bias is not None:
            _copy_param(layer.bias, ref.bias, partition_dim=None)
        return layer


def _copy_param(param: torch.Tensor, value: torch.Tensor, partition_dim: int | None) -> None:
    with torch.no_grad():
        param.copy_(value)
    if partition_dim is not None and not hasattr(param, "tensor_model_parallel"):
        _mark_parallel(param, partition_dim)


def _mark_parallel(param: torch.Tensor, dim: int) -> None:
    """The attributes megatron-core reads (gradient-norm de-duplication, checkpoints)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _local_param(value: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(value.detach().clone())
    _mark_parallel(p, 0)
    return p


class TPMamba2Mixer(Mamba2Mixer):
    """Mamba-2 mixer over this rank's groups and their heads (see the module docstring). The
    attributes hold local sizes, so :meth:`Mamba2Mixer.forward` runs unchanged on the shard."""

    def __init__(self, ref: Mamba2Mixer, tp: TPContext, layer: int, config: HybridConfig):
        nn.Module.__init__(self)  # not Mamba2Mixer.__init__: that would allocate the full-size weights
        n, r = tp.size, tp.rank
        self.tp, self.layer = tp, layer
        self.num_heads, self.head_dim = ref.num_heads // n, ref.head_dim
        self.num_groups, self.state_dim = ref.num_groups // n, ref.state_dim
        self.d_inner = self.num_heads * self.head_dim
        self.conv_dim = self.d_inner + 2 * self.num_groups * self.state_dim
        self.chunk_size, self.dt_limit = ref.chunk_size, ref.dt_limit
        shard = mamba_shard(MambaLayout.of(config, layer), n, r)
        heads, chans, conv_rows = shard.heads, shard.channels, shard.conv_rows
        # in_proj -> [z_r, x_r, B_r, C_r, dt_r]: rank r's chunk of each packed component
        self.in_proj = tp.column(ref.in_proj, shard.in_proj_rows)
        k = ref.conv1d.kernel_size[0]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, k, groups=self.conv_dim, padding=k - 1,
                                bias=ref.conv1d.bias is not None, device=ref.conv1d.weight.device,
                                dtype=ref.conv1d.weight.dtype)  # fmt: skip
        _copy_param(self.conv1d.weight, ref.conv1d.weight[conv_rows], 0)
        if ref.conv1d.bias is not None:
            _copy_param(self.conv1d.bias, ref.conv1d.bias[conv_rows], 0)
        self.dt_bias = _local_param(ref.dt_bias[heads])  # (H/tp,)
        self.A_log = _local_param(ref.A_log[heads])
        self.D = _local_param(ref.D[heads])
        # Norm groups are the B/C groups (group size d_inner / G), so whole norm groups stay local.
        self.norm = GatedGroupRMSNorm(self.d_inner, ref.norm.group_size, ref.norm.eps).to(ref.norm.weight)
        _copy_param(self.norm.weight, ref.norm.weight[chans], 0)
        self.out_proj = tp.row(ref.out_proj, chans)

    def forward(self, hidden_BLD: torch.Tensor, mask: LayerMask | None = None) -> torch.Tensor:
        hidden_BLD = self.tp.gather_sequence(hidden_BLD)
        with self.tp.precision(self.layer):
            return super().forward(hidden_BLD, self.tp.local_layer_mask(mask))


class TPAttention(Attention):
    """GQA attention over this rank's KV heads and the query heads that read them."""

    def __init__(self, ref: Attention, tp: TPContext, layer: int, config: HybridConfig):
        nn.Module.__init__(self)
        n, r = tp.size, tp.rank
        self.tp, self.layer = tp, layer
        self.num_heads, self.num_kv_heads, self.head_dim = ref.num_heads // n, ref.num_kv_heads // n, ref.head_dim
        q_rows, kv_rows = attention_shard(ref.num_heads, ref.num_kv_heads, ref.head_dim, n, r)  # whole heads
        self.q_proj = tp.column(ref.q_proj, q_rows)
        self.k_proj = tp.column(ref.k_proj, kv_rows)
        self.v_proj = tp.column(ref.v_proj, kv_rows)
        self.o_proj = tp.row(ref.o_proj, q_rows)

    def forward(self, hidden_BLD: torch.Tensor, mask: LayerMask | None = None) -> torch.Tensor:
        hidden_BLD = self.tp.gather_sequence(hidden_BLD)
        with self.tp.precision(self.layer):
            return super().forward(hidden_BLD, self.tp.local_layer_mask(mask))


class TPMLP(MLPMixer):
    """Squared-ReLU MLP over this rank's intermediate neurons."""

    def __init__(self, ref: MLPMixer, tp: TPContext, layer: int, config: HybridConfig):
        nn.Module.__init__(self)
        self.tp, self.layer = tp, layer
        neurons = shard_index(ref.up_proj.out_features, tp.size, tp.rank)
        self.up_proj = tp.column(ref.up_proj, neurons)
        self.down_proj = tp.row(ref.down_proj, neurons)

    def forward(self, hidden_BLD: torch.Tensor, mask: LayerMask | None = None) -> torch.Tensor:
        hidden_BLD = self.tp.gather_sequence(hidden_BLD)
        with self.tp.precision(self.layer):
            return super().forward(hidden_BLD, self.tp.local_layer_mask(mask))


class SequenceParallelBlock(HybridBlock):
    """A block whose residual stream holds this rank's positions only (sequence parallelism). The
    first block splits the (replicated) embedding output. The hidden mask and the depth scale are
    used on this rank's positions, so their gradients are summed over the group; the pre-norm
    weight is marked for the same sum after backward (:func:`allreduce_sequence_parallel_grads`)."""

    def __init__(self, ref: HybridBlock, tp: TPContext, first: bool):
        nn.Module.__init__(self)  # adopts ref's modules: parameter names stay the same
        self.layer_type, self.norm, self.mixer = ref.layer_type, ref.norm, ref.mixer
        self.tp, self.first = tp, first
        self.norm.weight.sequence_parallel = True

    def forward(self, hidden_BLD: torch.Tensor, hidden_mask: torch.Tensor | None = None,
                mask: LayerMask | None = None) -> torch.Tensor:  # fmt: skip
        if self.first:
            hidden_BLD = self.tp.scatter_sequence(hidden_BLD)
        if mask is not None and torch.is_tensor(mask.keep):
            mask = dataclasses.replace(mask, keep=self.tp.sum_partial_grads(mask.keep))
        return super().forward(hidden_BLD, self.tp.sum_partial_grads(hidden_mask), mask)


class SequenceParallelFinalNorm(RMSNorm):
    """The final norm gathers the whole sequence first: the output layer needs every position, and
    from here on everything is replicated (so the gather's backward keeps this rank's positions)."""

    def __init__(self, ref: RMSNorm, tp: TPContext):
        nn.Module.__init__(self)
        self.weight, self.eps, self.tp = ref.weight, ref.eps, tp

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(self.tp.gather_sequence(x, partial_grad=False), mask)


# The tensor-parallel layer spec: which variant replaces the mixer of each pattern symbol.
TP_MIXERS: Mapping[str, type[nn.Module]] = {MAMBA: TPMamba2Mixer, ATTENTION: TPAttention, MLP: TPMLP}


class VocabParallelHead(nn.Module):
    """Vocabulary-sharded logits (b, L, V/tp) in fp32: a column-parallel product with the output
    (or tied embedding) weight shard; the input gradient is all-reduced over the group."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPContext):
        super().__init__()
        # megatron-core's layer in every spec: the output layer stays in bf16 (never FP8)
        self.linear = _megatron_classes()[0](hidden_size, vocab_size, config=tp.mp_config, init_method=_no_init,
                                             bias=False, gather_output=False, skip_weight_param_allocation=True,
                                             tp_group=tp.group)  # fmt: skip

    def forward(self, hidden_BLD: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_BLD, weight).float()


def model_parallel_config(tp_size: int, dtype: torch.dtype, device: torch.device, *, sequence_parallel: bool = False):
    """megatron-core ModelParallelConfig for layers that receive copied weights (no initialisation)."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        use_cpu_initialization=device.type != "cuda",  # else megatron allocates on the current CUDA device
        perform_initialization=False,
        gradient_accumulation_fusion=False,  # needs APEX's fused kernel
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


def tp_context(model: HybridLM) -> TPContext | None:
    """The TPContext of a model :func:`apply_tensor_parallel` has split (None for a plain model)."""
    for module in model.modules():
        tp = getattr(module, "tp", None)
        if isinstance(tp, TPContext):
            return tp
    return None


@torch.no_grad()
def apply_tensor_parallel(model: HybridLM, tp_group, *, linears: str = "megatron", fp8=None,
                          amax_group=None, sequence_parallel: bool = False) -> HybridLM:  # fmt: skip
    """Split ``model`` (single-device build, same weights on every rank) over ``tp_group``, in place.

    Afterwards ``model(tokens, elastic=global_state)`` returns this rank's vocabulary shard of the
    logits, (b, L, V / tp) fp32; train it with :mod:`megatron_elastic.parallel.losses`.

    ``linears`` picks the mixers' linear implementation from :data:`LINEAR_SPECS`: ``"megatron"``
    (megatron-core layers, any device) or ``"transformer_engine"`` (CUDA). ``fp8`` (an enabled
    :class:`~megatron_elastic.config.schema.FP8Config`, Transformer Engine only) runs the inner
    layers' GEMMs in FP8, amax statistics reduced over ``amax_group`` (default: ``tp_group``).

    ``sequence_parallel``: inside the blocks each rank keeps only its share of the positions
    (sequence lengths must be multiples of the TP size); call
    :func:`allreduce_sequence_parallel_grads` after backward (or let megatron-core's
    ``finalize_model_grads`` do it). Logits, losses and masks are as without it.
    """
    if tp_context(model) is not None:
        raise ValueError("apply_tensor_parallel: the model is already tensor parallel")
    if tp_group is None:
        raise ValueError("apply_tensor_parallel needs the tensor-parallel process group (torch.distributed initialised)")
    if linears not in LINEAR_SPECS:
        raise ValueError(f"linears={linears!r}; choose one of {', '.join(LINEAR_SPECS)}")
    config = model.config
    size, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    check_tp_divisibility(config, size)
    fp8_on = fp8 is not None and fp8.enabled
    if fp8_on:
        if linears != "transformer_engine":
            raise ConfigError("parallel.fp8.enabled=true needs the Transformer Engine layers (linears='transformer_engine')")
        check_fp8_divisibility(config, size)
    sequence_parallel = bool(sequence_parallel) and size > 1
    factories = LINEAR_SPECS[linears](sequence_parallel)
    ref_weight = model.embedding.weight
    mp = model_parallel_config(size, ref_weight.dtype, ref_weight.device)
    tp = TPContext(group=tp_group, size=size, rank=rank, mp_config=mp, linears=factories,
                   fp8=fp8 if fp8_on else None, amax_group=tp_group if amax_group is None else amax_group,
                   num_layers=config.num_layers, sequence_parallel=sequence_parallel)  # fmt: skip
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

    vocab_rows = shard_index(config.vocab_size, size, rank)
    emb = VocabParallelEmbedding(config.vocab_size, config.hidden_size, init_method=_no_init, config=mp, tp_group=tp_group)
    _copy_param(emb.weight, ref_weight[vocab_rows], 0)
    for i, block in enumerate(model.layers):
        block.mixer = TP_MIXERS[block.layer_type](block.mixer, tp, i, config)
    if model.output_layer is not None:  # holds the weight shard; the head computes with it
        out = _megatron_classes()[0](config.hidden_size, config.vocab_size, config=mp, init_method=_no_init,
                                     bias=False, gather_output=False, tp_group=tp_group)  # fmt: skip
        _copy_param(out.weight, model.output_layer.weight[vocab_rows], 0)
        model.output_layer = out
    model.embedding = emb
    model.head = VocabParallelHead(config.hidden_size, config.vocab_size, tp)
    if sequence_parallel:
        for i, block in enumerate(model.layers):
            model.layers[i] = SequenceParallelBlock(block, tp, first=i == 0)
        model.final_norm = SequenceParallelFinalNorm(model.final_norm, tp)
    return model.to(ref_weight.device)


# ----------------------------------------------------------------------------- layouts


def tp_component_slices(model: nn.Module) -> dict[str, list[TPComponent]]:
    """Parameter name -> its components. For any tensor shaped like the local parameter (the
    parameter or its optimizer state), ``t[c.local_slice]`` is this rank's piece of the global
    tensor ``c.key``, split along ``c.shard_axis`` over the TP ranks in rank order (None =
    replicated). Keys do not depend on the layout: a plain model gives the same keys at TP=1."""
    tp = tp_context(model)
    size = 1 if tp is None else tp.size
    config = model.config
    return {name: component_layout(config, name, p.dim(), size) for name, p in model.named_parameters()}


def merge_tp_state_dicts(shards: list[dict], config: HybridConfig) -> dict:
    """State dicts of ranks 0..tp-1 (rank order) -> the single-device state dict."""
    tp = len(shards)
    out = {}
    for name, first in shards[0].items():
        if not torch.is_tensor(first):  # megatron-core layers' empty ``_extra_state``
            continue
        pieces = []
        for c in component_layout(config, name, first.dim(), tp):
            local = [s[name][c.local_slice] for s in shards]
            pieces.append(local[0] if c.shard_axis is None else torch.cat(local, dim=c.shard_axis))
        out[name] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)).clone()
    return out


def split_tp_state_dict(full: dict, config: HybridConfig, tp_rank: int, tp_size: int) -> dict:
    """The single-device state dict -> rank ``tp_rank``'s state dict in a ``tp_size``-way split."""
    check_tp_divisibility(config, tp_size)
    out = {}
    for name, tensor in full.items():
        if torch.is_tensor(tensor):
            out[name] = torch.cat([tensor[p] for p in shard_pieces(config, name, tensor.shape, tp_size, tp_rank)])
    return out
