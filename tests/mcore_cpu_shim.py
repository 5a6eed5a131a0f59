"""Test support: run megatron-core's pipeline schedule, DDP and mixed-precision / distributed
optimizer in CPU / gloo processes.

megatron-core 0.16's 1F1B schedule, point-to-point communicator, ``DistributedDataParallel``,
``ParamAndGradBuffer`` and optimizers are device-agnostic except for a few hard-coded CUDA spots:

* ``pipeline_parallel/schedules.py`` counts tokens in ``torch.zeros([], dtype=torch.int, device="cuda")``;
* ``pipeline_parallel/p2p_communication.py`` allocates receive buffers with
  ``device=torch.cuda.current_device()`` (and may call ``torch.cuda.synchronize()``);
* ``distributed/param_and_grad_buffer.py`` allocates the parameter and gradient buffers with
  ``device=torch.cuda.current_device()``; ``optimizer/optimizer.py``, ``optimizer/distrib_optimizer.py``
  and ``optimizer/clip_grads.py`` make small tensors with ``device='cuda'`` / ``torch.cuda.current_device()``,
  and so does ``utils.py``'s ``local_multi_tensor_l2_norm`` (the grad norm without Apex / Transformer Engine);
* the optimizers' constructors sort parameters by ``param.type()`` strings
  (``'torch.cuda.BFloat16Tensor'``, ``'torch.cuda.FloatTensor'``, else ``TypeError``) and
  ``clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``.

:func:`install` gives exactly those modules (and ``distributed/distributed_data_parallel.py``) a
view of ``torch`` (``utils.py`` too) in which ``device="cuda"`` means the CPU (``zeros``, ``empty``, ``tensor``),
``torch.cuda.current_device()`` is the CPU and ``torch.cuda.synchronize()`` does nothing; and
wraps the two optimizer constructors and ``clip_grad_by_total_norm_fp32`` so that, while they run,
``Tensor.type()`` without arguments names a CPU tensor as its CUDA type. Everything else (the
schedule's order of forwards and backwards, the gloo sends, receives, all-reduces,
reduce-scatters and all-gathers, the buffers' layout, Adam, the autograd) is megatron-core's and
PyTorch's own code, unchanged. Nothing in the library imports this module; the library refuses
``parallel.pp > 1``, ``parallel.distributed_optimizer`` and bfloat16 weights without CUDA instead.
"""

from __future__ import annotations

import contextlib
import functools
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

    def tensor(*args, device=None, **kw):
        return torch.tensor(*args, device=_cpu(device), **kw)

    view.zeros, view.empty, view.tensor = zeros, empty, tensor
    view.cuda = _CudaOnCpu(current_device=lambda: torch.device("cpu"), synchronize=lambda *a, **k: None)
    return view


_type = torch.Tensor.type


def _cuda_type(self, *args, **kw):
    name = _type(self, *args, **kw)
    if args or kw or self.is_cuda or not name.startswith("torch."):
        return name
    return "torch.cuda." + name[len("torch."):]


@contextlib.contextmanager
def _cuda_type_names():
    torch.Tensor.type = _cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = _type


def _with_cuda_type_names(fn):
    if getattr(fn, "_cuda_type_names", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with _cuda_type_names():
            return fn(*args, **kw)

    wrapper._cuda_type_names = True
    return wrapper


def install() -> None:
    """Point megatron-core's schedule, p2p, DDP, buffer and optimizer modules at the CPU view of
    torch and scope the ``type()`` names to the optimizer constructors and the clipping (idempotent)."""
    from megatron.core import utils
    from megatron.core.distributed import distributed_data_parallel, param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    for module in (schedules, p2p_communication, distributed_data_parallel, param_and_grad_buffer, optimizer,
                   distrib_optimizer, clip_grads, utils):  # fmt: skip
        if getattr(module.torch, "__name__", "") != "torch_on_cpu":
            module.torch = _torch_view()
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        if "__init__" in vars(cls):
            cls.__init__ = _with_cuda_type_names(cls.__init__)
    optimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(optimizer.clip_grad_by_total_norm_fp32)
