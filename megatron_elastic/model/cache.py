"""Decoding state for incremental generation: what each layer keeps between calls.

A Mamba-2 layer keeps the last ``kernel - 1`` inputs of its causal convolution and its SSM state;
an attention layer keeps the keys and values of every position seen so far; an MLP keeps nothing.
``HybridLM.forward_cached(tokens, cache)`` reads and advances an :class:`InferenceCache`, so that
feeding a sequence in pieces computes what one full-sequence forward computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MambaState:
    """State of one Mamba-2 mixer after the tokens seen so far."""

    conv: torch.Tensor
    """(batch, kernel - 1, conv_dim): the last inputs of the depthwise conv over [x, B, C]
    (zeros before the first token, as the conv's left padding)."""
    ssm: torch.Tensor
    """(batch, heads, head_dim, state_dim) fp32: h_t of the selective scan."""


@dataclass
class KVCache:
    """Keys and values of one attention layer (no positional encoding, so they never change)."""

    k: torch.Tensor
    """(batch, kv_heads, seen, head_dim)."""
    v: torch.Tensor
    """(batch, kv_heads, seen, head_dim)."""


@dataclass
class InferenceCache:
    """One entry per layer of the model (``None`` until the layer has seen a token, and always for MLPs)."""

    layers: list = field(default_factory=list)
    seq_len: int = 0
    """Tokens consumed so far."""

    @classmethod
    def empty(cls, num_layers: int) -> InferenceCache:
        return cls(layers=[None] * num_layers, seq_len=0)
