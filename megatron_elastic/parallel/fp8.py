"""FP8 training with Transformer Engine (CUDA only; imported lazily, so this module loads on CPU).

The FP8 recipe is part of the run config (the ``parallel.fp8*`` keys, read by
:meth:`FP8Config.from_parallel`). With FP8 on, :func:`megatron_elastic.parallel.tensor.apply_tensor_parallel`
builds the linears as Transformer Engine layers (:func:`te_linear_factories`, the Transformer-Engine entry of
the linear spec) and runs each mixer's GEMMs in FP8 under the recipe, except the first and last
``bf16_layers`` layers, which stay in bf16 as Nemotron-H keeps them. Embedding, norms, the Mamba
scan, attention scores and the output layer are never FP8.

FP8 GEMMs need dimensions that are multiples of 16: :func:`check_fp8_divisibility` checks the
model's local GEMM shapes at the TP degree and every elastic choice (so each extracted child can
run in FP8 as well).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import ATTENTION, MAMBA, MLP, HybridConfig

FP8_MULTIPLE = 16
FORMATS = ("hybrid", "e4m3")
RECIPES = ("delayed", "tensorwise")


@dataclass(kw_only=True)
class FP8Config:
    """The FP8 recipe (Transformer Engine)."""

    enabled: bool = False
    """Run the GEMMs of the inner layers in FP8."""
    format: str = "hybrid"
    """'hybrid' (E4M3 forward, E5M2 gradients) or 'e4m3' (both)."""
    recipe: str = "delayed"
    """Scaling: 'delayed' (amax history, Megatron's default) or 'tensorwise' (current per-tensor scaling)."""
    amax_history_len: int = 1024
    """Steps of amax history the delayed recipe keeps."""
    amax_compute_algo: str = "max"
    """'max' (of the history) or 'most_recent'."""
    margin: int = 0
    """Scale margin in powers of two."""
    bf16_layers: int = 1
    """The first and the last this-many layers stay in bf16."""

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"parallel.fp8={self.enabled!r} is invalid; use true or false")
        if self.format not in FORMATS:
            raise ConfigError(f"parallel.fp8_format={self.format!r} is invalid; use {' or '.join(FORMATS)}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"parallel.fp8_recipe={self.recipe!r} is invalid; use {' or '.join(RECIPES)}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ConfigError(f"parallel.fp8_amax_compute_algo={self.amax_compute_algo!r} is invalid; use max or most_recent")
        for name in ("amax_history_len", "margin", "bf16_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "amax_history_len" else 0):
                raise ConfigError(f"parallel.fp8_{name}={v!r} is invalid; it must be a "
                                  f"{'positive' if name == 'amax_history_len' else 'non-negative'} integer")  # fmt: skip

    @classmethod
    def from_parallel(cls, parallel) -> FP8Config:
        """From a ParallelConfig's ``fp8`` / ``fp8_<field>`` keys (absent keys keep the defaults)."""
        kw = {"enabled": bool(getattr(parallel, "fp8", False))}
        for name in ("format", "recipe", "amax_history_len", "amax_compute_algo", "margin", "bf16_layers"):
            if hasattr(parallel, f"fp8_{name}"):
                kw[name] = getattr(parallel, f"fp8_{name}")
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def layer_in_fp8(self, index: int, num_layers: int) -> bool:
        """Whether layer ``index`` runs its GEMMs in FP8 (not one of the first/last bf16 layers)."""
        return self.enabled and self.bf16_layers <= index < num_layers - self.bf16_layers

    def te_recipe(self):
        """The Transformer Engine recipe object."""
        from transformer_engine.common import recipe as te_recipe

        fmt = te_recipe.Format.HYBRID if self.format == "hybrid" else te_recipe.Format.E4M3
        if self.recipe == "tensorwise":
            current = getattr(te_recipe, "Float8CurrentScaling", None)
            if current is None:
                raise ConfigError("parallel.fp8_recipe=tensorwise needs a newer Transformer Engine (Float8CurrentScaling); "
                                  "upgrade it or use parallel.fp8_recipe=delayed")  # fmt: skip
            return current(fp8_format=fmt)
        return te_recipe.DelayedScaling(fp8_format=fmt, margin=self.margin, amax_history_len=self.amax_history_len,
                                        amax_compute_algo=self.amax_compute_algo)  # fmt: skip


def _not_multiple(value: int) -> bool:
    return value % FP8_MULTIPLE != 0


def check_fp8_divisibility(config: HybridConfig, tp_size: int = 1, elastic_choices=None) -> None:
    """Raise ConfigError (one line naming the fix) unless every FP8 GEMM dimension is a multiple of 16:
    the model's local GEMM shapes at ``tp_size`` and every elastic choice."""
    from megatron_elastic.parallel.tensor import _choices_of

    c, tp = config, tp_size
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
        if _not_multiple(value):
            raise ConfigError(f"{what} = {value} is not a multiple of {FP8_MULTIPLE} as FP8 GEMMs need; "
                              f"resize the model or turn parallel.fp8 off")  # fmt: skip
    choices = _choices_of(elastic_choices, config)
    widths = {
        "hidden": lambda k: k,
        "ffn": lambda k: k,
        "mamba_head_dim": lambda k: k,
        "attn_heads": lambda k: k * c.head_dim,
        "mamba_heads": lambda k: k * c.mamba_head_dim,
    }
    for axis, width in widths.items():
        bad = [k for k in choices.get(axis, ()) if _not_multiple(width(k))]
        if bad:
            raise ConfigError(f"elastic.{axis} size {bad[0]} gives a GEMM width {width(bad[0])} that is not a multiple of "
                              f"{FP8_MULTIPLE} as FP8 needs; set elastic.multiple_of={FP8_MULTIPLE}")  # fmt: skip


# ----------------------------------------------------------------------------- Transformer Engine layers


def _te():
    try:
        import transformer_engine.pytorch as te
    except Exception as exc:  # ImportError, or a CUDA library missing at import time
        raise ConfigError(
            f"parallel.fp8 needs Transformer Engine, which cannot be imported here ({type(exc).__name__}: {exc}); "
            "install it on a CUDA machine (pip install --no-build-isolation -e '.[gpu]') or turn parallel.fp8 off"
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
    ``build(in_features, out_features, *, bias, tp_group, mp_config)`` on the current CUDA device."""
    te = _te()

    def build(mode):
        def make(in_features, out_features, *, bias, tp_group, mp_config):
            tp_size = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
            return te.Linear(
                in_features, out_features, bias=bias, params_dtype=mp_config.params_dtype, device="cuda",
                tp_group=tp_group, tp_size=tp_size, parallel_mode=mode if tp_size > 1 else None,
                sequence_parallel=False, init_method=lambda w: None,  # weights are copied in
            )  # fmt: skip

        return make

    return build("column"), build("row")
