"""Elastic machinery on top of the model: axes and architectures, masks, importance, permutation,
slicing. Names are imported on first use so the command line stays fast to start."""

from megatron_elastic.utils.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
