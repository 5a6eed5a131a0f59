"""Losses on vocabulary-sharded logits (b, L, V/tp), equal to the dense losses on the gathered logits.

Each rank holds a contiguous vocabulary chunk (rank order). The softmax statistics are combined
over the tensor-parallel group: the max by an all-reduce MAX (no gradient: log-sum-exp does not
depend on the shift) and sums by all-reduce SUM. The loss is the same on every rank and each rank
backpropagates it once, so the final sum of per-rank loss terms passes its gradient through
unchanged (megatron-core's ``reduce_from_tensor_model_parallel_region``), while a softmax
denominator, which every rank uses in its own terms, all-reduces its gradient. Nothing gathers
the logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _max_over_group(x: torch.Tensor, group) -> torch.Tensor:
    m = x.detach().amax(dim=-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def _total_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of the ranks' partial sums of the loss itself: forward all-reduce, backward identity
    (megatron-core's reduce-from-region; every rank backpropagates the same loss once)."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


class _SharedSum(torch.autograd.Function):
    """Sum over ranks of a statistic (a softmax denominator) that every rank then uses in its own
    vocabulary terms: its gradient is the sum of those ranks' contributions (backward all-reduce)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy on vocabulary-sharded logits (tokens, V/tp) with megatron-core's
    vocab-parallel cross-entropy arithmetic, over an explicit group. Returns (tokens,) fp32."""

    @staticmethod
    def forward(ctx, logits, labels, group):
        from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as VPCE

        rank = dist.get_rank(group)
        # megatron-core's helpers work in place: keep the caller's logits (also used by the KD loss)
        logits = logits.float().clone()
        logits, logits_max = VPCE.calculate_logits_max(logits)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        v = logits.shape[-1]
        start, end = rank * v, (rank + 1) * v
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = VPCE.calculate_predicted_logits(
            logits, labels, logits_max, start, end
        )
        dist.all_reduce(predicted, group=group)  # the target logit lives on exactly one rank
        dist.all_reduce(sum_exp, group=group)
        softmax, loss = VPCE.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as VPCE

        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = VPCE.prepare_gradient_calculation_operands(softmax, target_mask)
        grad = VPCE.calculate_gradients(grad_2d, arange_1d, masked_target_1d, update, grad_input, grad_loss)
        return grad, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, labels: torch.Tensor, tp_group, *,
                                 ignore_index: int = -100) -> torch.Tensor:  # fmt: skip
    """Mean next-token cross-entropy (scalar fp32) from vocabulary-sharded logits (..., V/tp) and
    global labels (...); equals ``F.cross_entropy`` on the gathered logits, ``ignore_index`` included."""
    v = logits_local.shape[-1]
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    per_token = _VocabParallelCE.apply(logits_local.reshape(-1, v), flat_labels.masked_fill(~valid, 0), tp_group)
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


def vocab_parallel_log_softmax(logits_local: torch.Tensor, tp_group) -> torch.Tensor:
    """log_softmax over the whole vocabulary of sharded logits; returns this rank's shard (fp32).

    For losses that sum per-vocabulary terms locally and then over the group with
    ``_total_over_group`` (the denominator's gradient collects every rank's terms).
    """
    x = logits_local.float()
    shifted = x - _max_over_group(x, tp_group).unsqueeze(-1)
    return shifted - torch.log(_SharedSum.apply(shifted.exp().sum(-1), tp_group)).unsqueeze(-1)


def vocab_parallel_kl(student_local: torch.Tensor, teacher_local: torch.Tensor, tp_group,
                      temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """KL(teacher || student) per token, averaged over tokens, times T^2, from vocabulary-sharded
    logits; equals :func:`megatron_elastic.distill.losses.forward_kl` (full vocabulary) on the
    gathered logits. The max and the sums of the two softmaxes are all-reduced over ``tp_group``."""
    t = temperature
    v = student_local.shape[-1]
    log_ps = vocab_parallel_log_softmax(student_local.reshape(-1, v).float() / t, tp_group)
    log_pt = vocab_parallel_log_softmax(teacher_local.reshape(-1, v).float() / t, tp_group)
    kl = _total_over_group((log_pt.exp() * (log_pt - log_ps)).sum(-1), tp_group)  # (tokens,)
    return kl.mean() * (t * t)
