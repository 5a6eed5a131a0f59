"""FP8 training with Transformer Engine (CUDA only; imported lazily, so this module loads on CPU).

The FP8 recipe is part of the run config: the ``parallel.fp8`` section,
:class:`megatron_elastic.config.schema.FP8Config` (:func:`te_recipe` turns it into Transformer Engine's
recipe). With FP8 on, :func:`megatron_elastic.parallel.tensor.apply_tensor_parallel`
builds the linears as Transformer Engine layers (:func:`te_linear_factories`, the Transformer-Engine entry of
the linear spec) and runs each mixer's GEMMs in FP8 under the recipe, except the first and last
``bf16_layers`` layers, which stay in bf16 as Nemotron-H keeps them. Embedding, norms, the Mamba
scan, attention scores and the output layer are never FP8.

FP8 GEMMs need dimensions that are multiples of :data:`FP8_MULTIPLE`:
:func:`megatron_elastic.parallel.tensor.check_fp8_divisibility` checks the model's local GEMM shapes at
the TP degree and every elastic choice (so each extracted child can run in FP8 as well).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_elastic.config.schema import FP8Config
from megatron_elastic.errors import ConfigError

FP8_MULTIPLE = 16


def te_recipe(fp8: FP8Config):
    """The Transformer Engine recipe object of the ``parallel.fp8`` section."""
    from transformer_engine.common import recipe

    fmt = recipe.Format.HYBRID if fp8.format == "hybrid" else recipe.Format.E4M3
    if fp8.recipe == "tensorwise":
        current = getattr(recipe, "Float8CurrentScaling", None)
        if current is None:
            raise ConfigError("parallel.fp8.recipe=tensorwise needs a newer Transformer Engine (Float8CurrentScaling); "
                              "upgrade it or use parallel.fp8.recipe=delayed")  # fmt: skip
        return current(fp8_format=fmt)
    return recipe.DelayedScaling(fp8_format=fmt, margin=fp8.margin, amax_history_len=fp8.amax_history_len,
                                 amax_compute_algo=fp8.amax_compute_algo)  # fmt: skip


# ----------------------------------------------------------------------------- Transformer Engine layers


def _te():
    try:
        import transformer_engine.pytorch as te
    except Exception as exc:  # ImportError, or a CUDA library missing at import time
        raise ConfigError(
            f"parallel.fp8 needs Transformer Engine, which cannot be imported here ({type(exc).__name__}: {exc}); "
            "install it on a CUDA machine (pip install --no-build-isolation -e '.[gpu]') or set parallel.fp8.enabled=false"
        ) from None
    return te


def fp8_context(recipe, enabled: bool, amax_group):
    """The Transformer Engine FP8 region (a null context when ``enabled`` is False)."""
    if not enabled:
        return contextlib.nullcontext()
    te = _te()
    if hasattr(te, "fp8_autocast"):
        return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)
    return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)  # newer TE names


def te_linear_factories(sequence_parallel: bool = False, reduce_scatter=None):
    """(column, row) builders of Transformer Engine linears for the TP context:
    ``build(in_features, out_features, *, bias, tp_group, mp_config)`` on the current CUDA device (on the
    meta device inside ``torch.device("meta")``, while a rank builds its part of a stored parent).

    Without sequence parallelism they are TE's own column / row parallel linears. With it the mixers
    gather the sequence themselves (see :mod:`megatron_elastic.parallel.tensor`), so the builders
    make *local* TE linears of the rank's shard, which communicate nothing: the column one holds
    ``out_features / tp`` rows (its input gradient is reduce-scattered by the mixer's gather), the
    row one ``in_features / tp`` columns, followed by ``reduce_scatter(x, tp_group)`` over the
    sequence and then its replicated bias on the rank's positions, the same order as
    :class:`~megatron_elastic.parallel.tensor.SequenceParallelRowLinear`. The GEMMs are TE's, in FP8.
    """
    te = _te()

    def world(tp_group) -> int:
        return 1 if tp_group is None else torch.distributed.get_world_size(tp_group)

    def target() -> str:  # the meta device while a rank builds its part of a stored parent (parallel.loading)
        return "meta" if torch.get_default_device().type == "meta" else "cuda"

    def build(mode):
        def make(in_features, out_features, *, bias, tp_group, mp_config):
            tp_size = world(tp_group)
            device = target()
            return te.Linear(
                in_features, out_features, bias=bias, params_dtype=mp_config.params_dtype, device=device,
                tp_group=tp_group, tp_size=tp_size, parallel_mode=mode if tp_size > 1 else None,
                sequence_parallel=False, init_method=lambda w: None,  # weights are copied in
            )  # fmt: skip

        return make

    if not sequence_parallel:
        return build("column"), build("row")
    if reduce_scatter is None:
        raise ValueError("sequence-parallel TE linears need the sequence reduce-scatter")
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    def column(in_features, out_features, *, bias, tp_group, mp_config):
        layer = te.Linear(in_features, out_features // world(tp_group), bias=bias, params_dtype=mp_config.params_dtype,
                          device=target(), parallel_mode=None, init_method=lambda w: None)  # fmt: skip
        if bias:  # a shard like the weight: counted on every rank by the gradient norm
            set_tensor_model_parallel_attributes(layer.bias, True, 0, 1)
        return layer

    def row(in_features, out_features, *, bias, tp_group, mp_config):
        return _sequence_parallel_row_class(te)(in_features // world(tp_group), out_features, bias=bias,
                                                params_dtype=mp_config.params_dtype, tp_group=tp_group,
                                                reduce_scatter=reduce_scatter, device=target())  # fmt: skip

    return column, row


_ROW_CLASS: list = []


def _sequence_parallel_row_class(te):
    """A local TE linear whose output is reduce-scattered over the sequence before its bias is added
    (one class per process, built on first use: TE is imported only on CUDA machines)."""
    if not _ROW_CLASS:

        class SequenceParallelTERow(te.Linear):
            def __init__(self, in_local: int, out_features: int, *, bias: bool, params_dtype, tp_group, reduce_scatter,
                         device: str = "cuda"):  # fmt: skip
                super().__init__(in_local, out_features, bias=bias, return_bias=bias, params_dtype=params_dtype,
                                 device=device, parallel_mode=None, init_method=lambda w: None)  # fmt: skip
                self.tp_group, self.reduce_scatter = tp_group, reduce_scatter
                if bias:  # gradient from this rank's positions only: summed over TP after backward
                    self.bias.sequence_parallel = True

            def forward(self, x):
                out = super().forward(x)
                out, bias = out if self.use_bias else (out, None)
                out = self.reduce_scatter(out, self.tp_group)
                return out if bias is None else out + bias

        _ROW_CLASS.append(SequenceParallelTERow)
    return _ROW_CLASS[0]
