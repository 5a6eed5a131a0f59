"""The masks a forward pass applies: the plain data type the model consumes.

Everything that *produces* masks (axes, router, importance, slicing) lives in
``megatron_elastic.elastic``; the model only reads an :class:`ElasticState`. Masks are vectors in
the model's global index space (1 = kept, 0 = dropped; soft masks hold values in [0, 1], e.g. a
probability-weighted sum of prefix masks). ``None`` means "everything kept".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerMask:
    """Masks of one layer; only those matching the layer's type are read."""

    ffn: torch.Tensor | None = None
    """(ffn_hidden_size,) on an MLP layer: which intermediate neurons are kept."""
    attn_heads: torch.Tensor | None = None
    """(num_attention_heads,) on an attention layer: which query heads are kept."""
    mamba_heads: torch.Tensor | None = None
    """(mamba_num_heads,) on a Mamba layer: which heads are kept (same count in every group)."""
    mamba_head_dim: torch.Tensor | None = None
    """(mamba_head_dim,) on a Mamba layer: which channels of every head are kept."""
    moe_experts: torch.Tensor | None = None
    """(num_moe_experts,) on an MoE layer: which routed experts are kept (the same count in every routing
    group). Dropped experts (mask 0) are never routed to; a kept expert's routing weight is scaled by its mask."""
    moe_ffn: torch.Tensor | None = None
    """(moe_ffn_hidden_size,) on an MoE layer: which intermediate neurons every routed expert keeps."""
    moe_shared_ffn: torch.Tensor | None = None
    """(moe_shared_expert_intermediate_size,) on an MoE layer: which neurons the shared expert keeps."""
    moe_topk: int | None = None
    """On an MoE layer: experts per token (None = the layer's own top-k)."""
    keep: float | torch.Tensor = 1.0
    """Depth: 0 skips the layer (identity, not computed), 1 keeps it, a tensor scales its output."""


@dataclass
class ElasticState:
    """Masks for one forward pass: the global hidden-channel mask and one :class:`LayerMask` per layer."""

    hidden: torch.Tensor | None = None
    """(hidden_size,): channels of the residual stream (embeddings, every norm, output layer)."""
    layers: list[LayerMask] = field(default_factory=list)
    """One entry per layer (empty = no per-layer masks)."""

    def layer(self, index: int) -> LayerMask | None:
        return self.layers[index] if self.layers else None
