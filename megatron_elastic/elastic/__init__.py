"""Elastic machinery on top of the model: axes and architectures, masks, importance, permutation,
slicing. Names are imported on first use so the command line stays fast to start."""

import importlib

_EXPORTS = {
    "extract": "megatron_elastic.elastic.slicing",
    **{name: "megatron_elastic.elastic.space" for name in (
        "AXES", "Architecture", "Axis", "LayerArch", "axes_of", "child_config", "full_architecture", "hard_state",
        "homogeneous", "layer_axes", "validate_architecture",
    )},
    "ElasticSpace": "megatron_elastic.elastic.search_space",
    "Router": "megatron_elastic.elastic.router",
    "tau_at": "megatron_elastic.elastic.router",
    "scale_at": "megatron_elastic.elastic.router",
    "Cost": "megatron_elastic.elastic.costs",
    "router_loss": "megatron_elastic.elastic.costs",
    "BudgetSampler": "megatron_elastic.elastic.sampler",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_elastic.elastic' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
