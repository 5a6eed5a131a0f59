"""Elastic machinery on top of the model: axes and architectures, masks, slicing (and, above them,
importance, permutation, router and costs)."""

from megatron_elastic.elastic.slicing import extract
from megatron_elastic.elastic.space import (
    AXES, Architecture, Axis, LayerArch, axes_of, child_config, full_architecture, hard_state, homogeneous,
    layer_axes, validate_architecture,
)  # fmt: skip

__all__ = [
    "AXES", "Architecture", "Axis", "LayerArch", "axes_of", "child_config", "extract", "full_architecture",
    "hard_state", "homogeneous", "layer_axes", "validate_architecture",
]  # fmt: skip
