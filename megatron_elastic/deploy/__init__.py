"""Deployment: per-budget post-training quantization with NVIDIA Model-Optimizer (FP8, INT8,
INT4-AWQ; NVFP4 on CUDA) exported as quantized Hugging Face checkpoints, and a reader that runs
those exports. Names are imported on first use (Model-Optimizer is imported only when quantizing).
"""

from megatron_elastic.utils.lazy import lazy_exports

_EXPORTS = {
    "FORMATS": "megatron_elastic.deploy.quantize",
    "quantize_and_export": "megatron_elastic.deploy.quantize",
    "data_windows": "megatron_elastic.deploy.quantize",
    "mean_loss": "megatron_elastic.deploy.quantize",
    "load_quantized": "megatron_elastic.deploy.load",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
