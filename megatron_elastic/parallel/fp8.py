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


def te_linear_factories():
    """(column, row) builders of Transformer Engine linears for the TP context:
    ``build(in_features, out_features, *, bias, tp_group, mp_config)`` on the current CUDA device (on the
    meta device inside ``torch.device("meta")``)."""
    te = _te()

    def build(mode):
        def make(in_features, out_features, *, bias, tp_group, mp_config):
            tp_size = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
            # on the meta device while a rank builds its part of a stored parent (parallel.loading)
            device = "meta" if torch.get_default_device().type == "meta" else "cuda"
            return te.Linear(
                in_features, out_features, bias=bias, params_dtype=mp_config.params_dtype, device=device,
                tp_group=tp_group, tp_size=tp_size, parallel_mode=mode if tp_size > 1 else None,
                sequence_parallel=False, init_method=lambda w: None,  # weights are copied in
            )  # fmt: skip

        return make

    return build("column"), build("row")
