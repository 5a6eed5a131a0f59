"""Test support: run megatron-core's pipeline schedule in CPU / gloo processes.

megatron-core 0.16's 1F1B schedule and its point-to-point communicator are device-agnostic except
for a few hard-coded CUDA spots:

* ``pipeline_parallel/schedules.py`` counts tokens in ``torch.zeros([], dtype=torch.int, device="cuda")``;
* ``pipeline_parallel/p2p_communication.py`` allocates receive buffers with
  ``device=torch.cuda.current_device()`` (and may call ``torch.cuda.synchronize()``).

:func:`install` gives exactly those two modules a view of ``torch`` in which ``device="cuda"``
means the CPU, ``torch.cuda.current_device()`` is the CPU and ``torch.cuda.synchronize()`` does
nothing. Everything else (the schedule's order of forwards and backwards, the gloo sends and
receives, the autograd) is megatron-core's and PyTorch's own code, unchanged. Nothing in the
library imports this module; the library refuses ``parallel.pp > 1`` without CUDA instead.
"""

from __future__ import annotations

import types

import torch


class _CudaOnCpu(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _cpu(device):
    return "cpu" if (device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda")) else device


def _torch_view() -> types.ModuleType:
    view = types.ModuleType("torch_on_cpu")
    view.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})

    def zeros(*args, device=None, **kw):
        return torch.zeros(*args, device=_cpu(device), **kw)

    def empty(*args, device=None, **kw):
        return torch.empty(*args, device=_cpu(device), **kw)

    view.zeros, view.empty = zeros, empty
    view.cuda = _CudaOnCpu(current_device=lambda: torch.device("cpu"), synchronize=lambda *a, **k: None)
    return view


def install() -> None:
    """Point megatron-core's schedule and p2p modules at the CPU view of torch (idempotent)."""
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    for module in (schedules, p2p_communication):
        if getattr(module.torch, "__name__", "") != "torch_on_cpu":
            module.torch = _torch_view()
