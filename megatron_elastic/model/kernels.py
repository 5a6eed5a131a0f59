"""The one place that decides between the pure-PyTorch Mamba path and the mamba-ssm CUDA kernels.

``backend_for(tensor)`` returns ``"mamba_ssm"`` when the tensor lives on a CUDA device and both
``mamba_ssm`` and ``causal_conv1d`` import, else ``"torch"``. The environment variable
``MEGATRON_ELASTIC_SSM_BACKEND`` (``auto`` | ``torch`` | ``mamba_ssm``) overrides the choice; asking
for ``mamba_ssm`` where it cannot run is an error rather than a silent fallback.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.ssd import ssd_chunked

ENV_VAR = "MEGATRON_ELASTIC_SSM_BACKEND"


@functools.lru_cache(maxsize=None)
def _cuda_kernels():
    """(causal_conv1d_fn, mamba_chunk_scan_combined) or None; imported lazily, once."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a broken CUDA build raising at import time
        return None
    return causal_conv1d_fn, mamba_chunk_scan_combined


def kernels_available() -> bool:
    return torch.cuda.is_available() and _cuda_kernels() is not None


def backend_for(tensor: torch.Tensor) -> str:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice not in ("auto", "torch", "mamba_ssm"):
        raise ConfigError(f"{ENV_VAR}={choice!r} is invalid; use auto, torch or mamba_ssm")
    if choice == "torch":
        return "torch"
    usable = tensor.is_cuda and _cuda_kernels() is not None
    if choice == "mamba_ssm" and not usable:
        raise ConfigError(
            f"{ENV_VAR}=mamba_ssm but the mamba-ssm/causal-conv1d kernels cannot run here (need CUDA "
            "tensors and `pip install megatron-elastic[gpu]`); unset it to use the PyTorch path"
        )
    return "mamba_ssm" if usable else "torch"


def causal_conv1d_silu(x_BDL: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str):
    """Causal depthwise conv1d followed by SiLU.  x (b, dim, L), weight (dim, kernel)."""
    if backend == "mamba_ssm":
        causal_conv1d_fn, _ = _cuda_kernels()
        return causal_conv1d_fn(x_BDL, weight, bias, activation="silu")
    L = x_BDL.shape[-1]
    out = F.conv1d(x_BDL, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=weight.shape[0])
    return F.silu(out[..., :L])


def ssd_scan(x, dt_raw, A, B, C, D, dt_bias, *, dt_limit, chunk_size, backend: str):
    """Selective scan from raw dt: dt = clamp(softplus(dt_raw + dt_bias), *dt_limit).  Returns fp32.

    x (b, L, h, p), dt_raw (b, L, h), A/D/dt_bias (h,), B/C (b, L, g, n).
    """
    if backend == "mamba_ssm":
        _, chunk_scan = _cuda_kernels()
        y = chunk_scan(
            x, dt_raw, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=tuple(dt_limit)
        )
        return y.float()
    dt = F.softplus(dt_raw.float() + dt_bias.float()).clamp(min=dt_limit[0], max=dt_limit[1])
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D)
