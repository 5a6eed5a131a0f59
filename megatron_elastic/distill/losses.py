"""Distillation losses on logits (single device; a vocab-parallel variant belongs to parallel/).

All losses are means over tokens, computed in fp32.
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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten())
