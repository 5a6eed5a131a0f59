"""Read a Model-Optimizer quantized Hugging Face export back into a runnable :class:`HybridLM`.

This is how the exports are checked on any machine: every quantized linear layer is rebuilt from
what is stored on disk — the FP8 / INT8 / packed-INT4 weight codes times their scales, the static
activation scale (inputs are quantized and dequantized with it, as an FP8 / INT8 runtime does) and
the AWQ ``pre_quant_scale`` — so the measured loss is the loss of the checkpoint as shipped.
Serving runtimes (TensorRT-LLM, vLLM) read the same files with their own kernels.

Stored layouts (Model-Optimizer 0.47 unified export), per quantized ``<name>``:

* FP8 (``quant_algo`` FP8): ``weight`` float8_e4m3fn, ``weight_scale`` () fp32, ``input_scale`` ();
  value = code * scale.
* INT8 (W8A8_SQ_PER_CHANNEL): ``weight`` int8, ``weight_scale`` (out,), ``input_scale`` ().
* INT4 AWQ (W4A16_AWQ): ``weight`` uint8 (out / 2, in): output rows 2r and 2r+1 packed as the low and
  high nibble of byte (r, c), signed 4-bit; ``weight_scale`` (out, in / block);
  ``pre_quant_scale`` (in,) multiplies the input.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megatron_elastic.errors import CheckpointError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_ACTIVATIONS = {"FP8": "fp8", "W8A8_SQ_PER_CHANNEL": "int8", "W4A16_AWQ": None}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out / 2, in) uint8 -> (out, in) int8 in [-8, 7]: row 2r is the low nibble of byte row r, 2r+1 the high."""
    b = packed.view(torch.uint8).to(torch.int16)
    low, high = b & 0x0F, (b >> 4) & 0x0F
    rows = torch.stack([low, high], dim=1).reshape(-1, packed.shape[-1])  # (out, in)
    return ((rows ^ 8) - 8).to(torch.int8)  # two's complement of a nibble


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weight (out, in) from stored codes and their scale (any of the layouts above)."""
    if weight.dtype == torch.float8_e4m3fn:
        return weight.float() * scale.float()
    if weight.dtype == torch.int8:
        return weight.float() * scale.float().reshape(-1, 1)
    if weight.dtype == torch.uint8:
        q = unpack_int4(weight).float()
        block = q.shape[1] // scale.shape[1]
        return q * scale.float().repeat_interleave(block, dim=1)
    raise CheckpointError(f"quantized weight of dtype {weight.dtype} is not a layout this reader knows (FP8, INT8, INT4)")


class QuantLinear(nn.Module):
    """``F.linear(QDQ(x * pre_quant_scale), W)`` with W dequantized once from the stored codes and
    QDQ the static per-tensor activation quantization (FP8 or INT8; identity for weight-only INT4)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, activation: str | None,
                 input_scale: torch.Tensor | None, pre_quant_scale: torch.Tensor | None):  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.activation = activation
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))
        self.register_buffer("pre_quant_scale", None if pre_quant_scale is None else pre_quant_scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.activation is not None and self.input_scale is not None:
            s = self.input_scale.to(x.dtype)
            if self.activation == "fp8":
                x = (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * s
            else:
                x = (x / s).round().clamp(-128, 127) * s
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


def load_quantized(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """A :class:`~megatron_elastic.model.HybridLM` (eval mode) computing what the quantized export at ``path`` computes."""
    from megatron_elastic.convert.hf import config_from_hf, read_hf_weights, state_from_hf
    from megatron_elastic.convert.native import load_state_into
    from megatron_elastic.model.hybrid import HybridLM
    from megatron_elastic.utils.io import read_json

    path = Path(path)
    qcfg = read_json(path / "hf_quant_config.json", "Model-Optimizer quantization config")
    algo = (qcfg.get("quantization") or {}).get("quant_algo")
    if algo not in _ACTIVATIONS:
        raise CheckpointError(f"{str(path)!r}: quant_algo {algo!r} is not one this reader knows ({', '.join(_ACTIVATIONS)})")
    config = config_from_hf(read_json(path / "config.json", "Hugging Face config"), src=str(path / "config.json"))
    state = state_from_hf(read_hf_weights(path, dtype=None), src=str(path))
    quantized = sorted(k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale"))
    extras = {}
    for name in quantized:
        extras[name] = {s: state.pop(f"{name}.{s}", None) for s in ("weight_scale", "input_scale", "pre_quant_scale")}
        state[f"{name}.weight"] = dequantize_weight(state[f"{name}.weight"], extras[name]["weight_scale"])
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model = HybridLM(config, init=False).to(dtype)
    load_state_into(model, state, str(path))
    for name in quantized:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        setattr(parent, attr, QuantLinear(old.weight.detach(), None if old.bias is None else old.bias.detach(),
                                          activation=_ACTIVATIONS[algo], input_scale=extras[name]["input_scale"],
                                          pre_quant_scale=extras[name]["pre_quant_scale"]))  # fmt: skip
    model.quantized_modules = quantized
    return model.eval()
