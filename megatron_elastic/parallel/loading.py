"""Sharded loading: a rank builds its part of a stored model and reads only that part of the files.

The single-device model is built on the meta device (nothing allocated), split as training splits it
(the caller's ``parallelize``: tensor parallelism, then the pipeline stage cut), allocated at its local
shapes on the rank's device, and every local parameter is filled from the blocks of the stored tensor
that :func:`~megatron_elastic.model.layout.shard_pieces` names -- the partition the tensor-parallel
layers cut the whole model with. A rank holds only its stage's parameters, the sharded ones at 1/tp,
never the whole model; the values are bit for bit the ones
:func:`~megatron_elastic.parallel.tensor.apply_tensor_parallel` copies out of the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from megatron_elastic.model.config import HybridConfig
from megatron_elastic.model.hybrid import HybridLM
from megatron_elastic.model.layout import shard_pieces
from megatron_elastic.parallel.tensor import tp_context
from megatron_elastic.utils.io import TensorFiles


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate (uninitialised) every meta parameter and buffer of ``module`` on ``device``, in place, keeping
    the attributes megatron-core reads on parameters (``tensor_model_parallel``, ``partition_dim``, ...)."""
    attrs = {name: dict(vars(p)) for name, p in module.named_parameters()}
    module.to_empty(device=device)  # new Parameter objects: their attributes are put back below
    for name, p in module.named_parameters():
        vars(p).update(attrs[name])
    return module


@torch.no_grad()
def fill_shards(model: nn.Module, weights: TensorFiles, config: HybridConfig, tp_size: int, tp_rank: int) -> None:
    """Copy into every parameter of ``model`` (named as in the single-device model) rank ``tp_rank``'s
    blocks of the stored global tensor, cast to the parameter's dtype."""
    for name, param in model.named_parameters():
        shape = weights.shapes[name]
        offset = 0
        for block in shard_pieces(config, name, shape, tp_size, tp_rank):  # packed: stacked along dim 0
            rows = len(range(*block[0].indices(shape[0])))
            weights.read_into(name, block, param[offset: offset + rows])
            offset += rows
        assert offset == param.shape[0], (name, offset, tuple(param.shape))


def load_shards(path: str | Path, parallelize: Callable[[HybridLM], nn.Module], *, dtype: torch.dtype,
                device: torch.device | str, what: str = "checkpoint") -> nn.Module:  # fmt: skip
    """This rank's part of the model directory ``path`` (native or Hugging Face) in ``dtype`` on ``device``.

    ``parallelize`` maps the single-device :class:`HybridLM` to this rank's part (it runs on meta tensors);
    the result's parameters are then read from the files, each from its own blocks only. The stored
    tensors are checked against the config first (one CheckpointError naming what is missing or mis-shaped).
    """
    from megatron_elastic.api import open_weights, read_model_config
    from megatron_elastic.convert.native import check_shapes

    config = read_model_config(path, what=what)
    weights = open_weights(path, what=what)
    with torch.device("meta"):
        full = HybridLM(config, init=False).to(dtype)
        check_shapes({k: tuple(v.shape) for k, v in full.state_dict().items()}, weights.shapes, str(path))
        model = parallelize(full)
    materialize(model, device)
    tp = tp_context(model)
    fill_shards(model, weights, config, 1 if tp is None else tp.size, 0 if tp is None else tp.rank)
    return model
