"""Run configuration: dataclasses per component, YAML recipes, dotted overrides."""

from megatron_elastic.config.loader import apply_overrides, config_from_dict, dump_config, load_config, parse_override
from megatron_elastic.config.schema import DataConfig, RunConfig, TrackingConfig, TrainConfig

__all__ = [
    "DataConfig", "RunConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "config_from_dict",
    "dump_config", "load_config", "parse_override",
]  # fmt: skip
