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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs (accumulate like F.conv1d does), else the input's own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _CausalConv1dSiLU(torch.autograd.Function):
    """silu(bias + sum_k w[:, k] * x shifted right by K-1-k) on (b, L, D), with a hand-written backward.

    The depthwise causal convolution is K shifted multiply-adds along L, which on CPU is cheaper than
    mkldnn's depthwise conv1d and its backward in the channels-last layout the Mamba mixer works in.
    Saves x, the weight and the pre-activation.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        L = x.shape[1]
        K = weight.shape[-1]
        cdt = _compute_dtype(x.dtype)
        w = weight.to(cdt).t()  # (K, D): w[k] multiplies x[t - (K-1) + k]
        xc = x if x.dtype == cdt else x.to(cdt)
        pre = xc * w[K - 1] if bias is None else torch.addcmul(bias.to(cdt), xc, w[K - 1])
        for s in range(1, min(K, L)):
            pre[:, s:].addcmul_(xc[:, : L - s], w[K - 1 - s])
        ctx.save_for_backward(xc, weight, pre)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        return F.silu(pre).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xc, weight, pre = ctx.saved_tensors
        b, L, D = xc.shape
        K = weight.shape[-1]
        need_x, need_w, need_b = ctx.needs_input_grad
        gp = torch.ops.aten.silu_backward(grad_out.to(pre.dtype), pre)  # grad of the pre-activation
        w = weight.to(pre.dtype).t()
        dx = dw = db = None
        if need_x:
            dx = gp * w[K - 1]
            for s in range(1, min(K, L)):
                dx[:, : L - s].addcmul_(gp[:, s:], w[K - 1 - s])
            dx = dx.to(ctx.x_dtype)
        if need_w:
            # Reductions over (b, L) are much faster on contiguous tensors: products go to one buffer.
            buf = torch.empty(b * L * D, dtype=pre.dtype, device=pre.device)
            dw = pre.new_zeros(K, D)
            for s in range(min(K, L)):
                prod = buf[: b * (L - s) * D].view(b, L - s, D)
                torch.mul(gp[:, s:], xc[:, : L - s], out=prod)
                dw[K - 1 - s] = prod.sum((0, 1))
            dw = dw.t().to(weight.dtype)
        if need_b and ctx.has_bias:
            db = gp.sum((0, 1)).to(ctx.bias_dtype)
        return dx, dw, db


def causal_conv1d_silu_bld(x_BLD: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str):
    """Causal depthwise conv1d followed by SiLU, channels last.  x (b, L, dim), weight (dim, kernel).

    Returns (b, L, dim). ``x`` may be a strided view (e.g. a slice of the in_proj output).
    """
    if backend == "mamba_ssm":
        causal_conv1d_fn, _ = _cuda_kernels()
        return causal_conv1d_fn(x_BLD.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)
    return _CausalConv1dSiLU.apply(x_BLD, weight, bias)


def causal_conv1d_silu(x_BDL: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str):
    """Causal depthwise conv1d followed by SiLU.  x (b, dim, L), weight (dim, kernel)."""
    if backend == "mamba_ssm":
        causal_conv1d_fn, _ = _cuda_kernels()
        return causal_conv1d_fn(x_BDL, weight, bias, activation="silu")
    return _CausalConv1dSiLU.apply(x_BDL.transpose(1, 2), weight, bias).transpose(1, 2)


class _GatedGroupRMSNorm(torch.autograd.Function):
    """weight * RMSNorm(y * silu(z)) over consecutive groups of ``group_size`` channels, in at least fp32."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        *lead, d = y.shape
        cdt = torch.promote_types(y.dtype, torch.float32)
        sz = F.silu(z.to(cdt))
        u = y.to(cdt) * sz
        ug = u.reshape(*lead, d // group_size, group_size)
        rstd = torch.linalg.vector_norm(ug, dim=-1, keepdim=True).pow_(2).div_(group_size).add_(eps).rsqrt_()
        n = ug.mul_(rstd)  # normalised, (..., groups, group_size)
        out = n.view(*lead, d) * weight.to(cdt)
        ctx.save_for_backward(y, z, sz, weight, n, rstd)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, z, sz, weight, n, rstd = ctx.saved_tensors
        gs = ctx.group_size
        *lead, d = y.shape
        need_y, need_z, need_w = ctx.needs_input_grad[:3]
        g = grad_out.to(n.dtype)
        dy = dz = dw = None
        if need_w:
            dw = (g * n.view(*lead, d)).reshape(-1, d).sum(0).to(weight.dtype)
        if need_y or need_z:
            gn = (g * weight.to(n.dtype)).reshape(*lead, d // gs, gs)
            c = torch.linalg.vecdot(gn, n, dim=-1).unsqueeze(-1).div_(gs)
            du = gn.addcmul_(n, c, value=-1).mul_(rstd).view(*lead, d)  # grad of u = y * silu(z)
            if need_y:
                dy = (du * sz).to(y.dtype)
            if need_z:
                dz = torch.ops.aten.silu_backward(du.mul_(y.to(n.dtype)), z.to(n.dtype)).to(z.dtype)
        return dy, dz, dw, None, None


def gated_group_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float):
    """weight * RMSNorm(y * silu(z)) per group of ``group_size`` consecutive channels, computed in fp32.

    y, z (..., d) with d a multiple of group_size; weight (d,). Returns fp32 (..., d) (float64 for
    float64 inputs).
    """
    if y.shape[-1] % group_size:
        raise ValueError(f"last dim {y.shape[-1]} is not a multiple of group_size {group_size}")
    return _GatedGroupRMSNorm.apply(y, z, weight, group_size, eps)


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
