"""Greedy generation from any :class:`~megatron_elastic.model.HybridLM` (a parent, an extracted child
or a view child of :class:`~megatron_elastic.inference.ElasticModel`).

With ``use_cache=True`` the prompt runs once through the chunked path (filling each Mamba layer's
conv and SSM state and each attention layer's keys and values), then every new token costs one
single-token step. ``use_cache=False`` recomputes the whole sequence for each new token: the
reference the cached path is tested against.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, tokens: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to every row of ``tokens``.

    Args:
        model: a ``HybridLM`` (``model(tokens)`` -> logits, ``model.forward_cached``).
        tokens: LongTensor (batch, length), length >= 1; every row has the same length (no padding).
        max_new_tokens: >= 0.
        use_cache: incremental decoding (default) or full-sequence recomputation per token.

    Returns LongTensor (batch, length + max_new_tokens) on ``tokens``' device: the prompt, then the
    generated tokens.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor of shape (batch, length); got {getattr(tokens, 'shape', tokens)!r}")
    if tokens.shape[1] == 0:
        raise ValueError("tokens is empty (length 0); give a prompt of at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    tokens = tokens.long()
    if max_new_tokens == 0:
        return tokens.clone()
    was_training = model.training
    model.eval()
    try:
        out = [tokens]
        if use_cache:
            cache = model.new_cache()
            logits = model.forward_cached(tokens, cache)
            for i in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
                out.append(nxt)
                if i + 1 < max_new_tokens:
                    logits = model.forward_cached(nxt, cache)
        else:
            seq = tokens
            for _ in range(max_new_tokens):
                nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
            return seq
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
