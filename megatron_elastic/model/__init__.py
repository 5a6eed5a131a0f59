"""Single-device reference hybrid Mamba-2 / attention / MLP model."""

from megatron_elastic.model.config import HybridConfig, LayerDims, num_parameters, parse_pattern, preset
from megatron_elastic.model.elastic_state import ElasticState, LayerMask
from megatron_elastic.model.hybrid import HybridLM

__all__ = ["ElasticState", "HybridConfig", "HybridLM", "LayerDims", "LayerMask", "num_parameters", "parse_pattern", "preset"]
