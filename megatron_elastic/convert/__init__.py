"""Checkpoint conversion: native directories and Hugging Face ``nemotron_h`` directories."""

from megatron_elastic.convert.hf import config_from_hf, config_to_hf, is_hf_dir, load_hf, save_hf
from megatron_elastic.convert.native import is_native_dir, load_native, save_native

__all__ = ["config_from_hf", "config_to_hf", "is_hf_dir", "is_native_dir", "load_hf", "load_native", "save_hf", "save_native"]
