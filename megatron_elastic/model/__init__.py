"""Single-device reference hybrid Mamba-2 / attention / MLP model."""

from megatron_elastic.model.config import HybridConfig, num_parameters, parse_pattern, preset
from megatron_elastic.model.hybrid import HybridLM

__all__ = ["HybridConfig", "HybridLM", "num_parameters", "parse_pattern", "preset"]
