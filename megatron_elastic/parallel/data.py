"""Data parallelism: gradient and metric averaging over the data-parallel group.

With float32 weights and without the distributed optimizer (the default) the trainer averages
gradients itself with one flat all-reduce per step (gloo on CPU, NCCL on CUDA), which is what
megatron's DDP does without overlap, and keeps the single-process trainer's AdamW, replicated; its
checkpoints reshard through :mod:`megatron_elastic.checkpoint.dist`. bfloat16 weights and the
distributed optimizer use megatron-core's ``DistributedDataParallel`` instead (:mod:`parallel.optimizer`,
CUDA); the router's gradients always come through here.

Gradient accumulation: every micro-batch loss is a mean over equally sized micro-batches and is
divided by the local number of micro-batches, so the average over data-parallel ranks equals the
single-process gradient of the whole global batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def sync_grad_presence(params: list[torch.nn.Parameter], group) -> None:
    """Give a zero gradient to every parameter that has a gradient on *some* rank of ``group``.

    Elastic depth skipping can leave a layer without gradient on one rank only; the all-reduce
    needs the same tensors everywhere, and a parameter no rank touched must stay ``None`` (AdamW
    then skips it, as in a single process)."""
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_device(params))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    for p, f in zip(params, flags.tolist()):
        if f and p.grad is None:
            p.grad = torch.zeros_like(p)


def allreduce_gradients(params: Iterable[torch.nn.Parameter], group, *, average: bool = True) -> None:
    """All-reduce the gradients of ``params`` over ``group`` in one flat buffer (SUM, then / size)."""
    params = list(params)
    if group is None or dist.get_world_size(group) == 1 or not params:
        return
    sync_grad_presence(params, group)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def average_scalars(values: dict[str, float], group, device=None) -> dict[str, float]:
    """Mean of each scalar over ``group`` (every rank must pass the same keys)."""
    if group is None or dist.get_world_size(group) == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    t /= dist.get_world_size(group)
    return dict(zip(keys, t.tolist()))


def _device(params):
    return params[0].device if params else None
