"""Losses on logits (single device; the vocab-parallel variants belong to parallel/): the forward KL of
distillation and the one next-token cross-entropy every trainer and evaluation uses.

Computed in fp32; means over tokens unless a reduction says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
               top_k: int = 0) -> torch.Tensor:  # fmt: skip
    """KL(teacher || student) per token, averaged, times T^2 (so gradients keep their scale across T).

    ``top_k > 0``: only the teacher's k most likely tokens count; the teacher is renormalised over
    them and the student's log-probabilities (over the full vocabulary) are read at them.
    """
    t = temperature
    s = student_logits.float().flatten(0, -2) / t  # (tokens, vocab)
    te = teacher_logits.float().flatten(0, -2) / t
    log_ps = F.log_softmax(s, dim=-1)
    if top_k and top_k < te.shape[-1]:
        top_val, top_idx = te.topk(top_k, dim=-1)
        log_pt = F.log_softmax(top_val, dim=-1)
        log_ps = log_ps.gather(-1, top_idx)
    else:
        log_pt = F.log_softmax(te, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * (t * t)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` (..., vocab) against ``labels`` (...), in fp32;
    ``reduction``: ``"mean"`` (nats/token) or ``"sum"`` (over tokens)."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction=reduction)
