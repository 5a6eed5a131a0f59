"""Deployment: per-budget post-training quantization with NVIDIA Model-Optimizer (FP8, INT8,
INT4-AWQ; NVFP4 on CUDA) exported as quantized Hugging Face checkpoints, and a reader that runs
those exports. Names are imported on first use (Model-Optimizer is imported only when quantizing).
"""

import importlib

_EXPORTS = {
    "FORMATS": "megatron_elastic.deploy.quantize",
    "quantize_and_export": "megatron_elastic.deploy.quantize",
    "data_windows": "megatron_elastic.deploy.quantize",
    "mean_loss": "megatron_elastic.deploy.quantize",
    "load_quantized": "megatron_elastic.deploy.load",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_elastic.deploy' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
