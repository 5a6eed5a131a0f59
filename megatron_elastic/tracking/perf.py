"""Throughput numbers for the trackers: model FLOPs per token, an MFU estimate, memory.

FLOPs follow the usual accounting (Kaplan et al.; PaLM appendix B): a forward pass costs 2 FLOPs
per weight per token, forward + backward 6; attention adds ``2 * 2 * seq * (heads * head_dim)``
per attention layer and token in the forward pass (scores and the weighted sum; causal masking is
not discounted). The input embedding is a lookup and costs nothing. The Mamba scan's own FLOPs are
small next to its projections and are left out: the estimate is a slight lower bound.
"""

from __future__ import annotations

import os

# Dense bf16 peak of one device in TFLOP/s (vendor datasheets, SXM parts).
_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0))


def forward_flops_per_token(model_cfg, seq_len: int) -> float:
    """FLOPs of one forward pass per token of ``model_cfg`` (a HybridConfig) at ``seq_len``."""
    from megatron_elastic.model.config import ATTENTION, active_parameters, num_parameters

    counts = num_parameters(model_cfg)
    weights = active_parameters(model_cfg) - counts["embedding"]  # a token runs through its top-k experts only
    if model_cfg.tie_embeddings:  # the tied output projection is a real matmul
        weights += counts["embedding"]
    flops = 2.0 * weights
    for i, kind in enumerate(model_cfg.layer_types):
        if kind == ATTENTION:
            flops += 4.0 * seq_len * model_cfg.layer_dims(i).num_attention_heads * model_cfg.head_dim
    return flops


def peak_flops(device, configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured value, else a known GPU's, else None (CPU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def memory_metrics(device) -> dict[str, float]:
    """GPU: peak allocated / reserved since the last call (GiB); CPU: resident set size of this process."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        out = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
               "memory/reserved_gib": torch.cuda.memory_reserved(device) / 2**30}  # fmt: skip
        torch.cuda.reset_peak_memory_stats(device)
        return out
    try:
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        return {"memory/rss_gib": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30}
    except (OSError, ValueError, IndexError):
        return {}


def throughput_metrics(tokens_per_s: float, flops_per_token: float, *, device, num_devices: int = 1,
                       configured_tflops: float = 0.0) -> dict[str, float]:  # fmt: skip
    """``tflops`` achieved (model FLOPs) and ``mfu`` (when the device's peak is known), plus memory."""
    achieved = tokens_per_s * flops_per_token
    out = {"tflops": achieved / 1e12}
    peak = peak_flops(device, configured_tflops)
    if peak:
        out["mfu"] = achieved / (peak * num_devices)
    out.update(memory_metrics(device))
    return out
