"""The native model directory: what ``megatron-elastic`` writes and reads.

Layout (documented in docs/conversion.md)::

    DIR/
      megatron_elastic.json   {"format": "megatron-elastic-model", "format_version": 1,
                               "model": {HybridConfig fields}, "num_parameters": int, "dtype": str}
      model.safetensors       every parameter under its native name (see below)
      tokenizer*.json ...     optional, copied through conversions untouched

Native names: ``embedding.weight``, ``layers.{i}.norm.weight``, ``layers.{i}.mixer.<param>``
(Mamba: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj; attention: q/k/v/o_proj; MLP:
up/down_proj), ``final_norm.weight``, ``output_layer.weight`` (absent when tied).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_elastic.errors import CheckpointError
from megatron_elastic.model.config import HybridConfig, num_parameters
from megatron_elastic.model.hybrid import HybridLM
from megatron_elastic.utils.io import (
    TensorFiles,
    TensorSpecs,
    atomic_directory,
    load_safetensors,
    read_json,
    safetensors_keys,
    safetensors_order,
    write_json,
    write_safetensors,
)

META_FILE = "megatron_elastic.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "megatron-elastic-model"
FORMAT_VERSION = 1
# Files that travel with a model through conversions, untouched.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja",
)  # fmt: skip


def is_native_dir(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The one floating dtype of a state dict; float32 when it mixes several."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def check_shapes(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], source: str) -> None:
    """Stored tensor shapes against the ones a model config implies (name -> shape); every missing,
    unexpected or mis-shaped tensor is a CheckpointError."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"{source}: weights do not match the model config ({'; '.join(parts)}); the config and the "
            "weights come from different models, or the checkpoint is incomplete"
        )
    for key, shape in stored.items():
        if tuple(shape) != tuple(expected[key]):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(shape)} but the config implies "
                f"{tuple(expected[key])}; the config and the weights come from different models"
            )


def load_state_into(model: HybridLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; every missing, unexpected or mis-shaped key is a CheckpointError."""
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state.items()}, source)  # fmt: skip
    model.load_state_dict(state, strict=True)


def native_tensor_files(src: str | Path) -> TensorFiles:
    """The tensors of a native directory, read on demand (blocks of a tensor through a memory map)."""
    path = Path(src) / WEIGHTS_FILE
    return TensorFiles({key: (path, key) for key in safetensors_keys(path)})


@dataclass(frozen=True)
class NativeTensors:
    """A model given as a stream of its tensors instead of a module: a sharded parent assembles its
    tensors one at a time (``checkpoint.dist.stream_full_tensors``), so no process holds the whole
    model. :func:`save_native` writes each tensor as it arrives."""

    config: HybridConfig
    tensors: Iterable[tuple[str, torch.Tensor]]
    """(native name, full tensor) in ``safetensors_order(native_tensor_specs(config, dtype))``."""
    dtype: torch.dtype = torch.float32


def native_tensor_specs(config: HybridConfig, dtype: torch.dtype = torch.float32) -> TensorSpecs:
    """Native name -> (dtype, shape) of every tensor a model of ``config`` writes (no memory allocated)."""
    with torch.device("meta"):
        model = HybridLM(config, init=False)
    return {k: (dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


def save_native(model: HybridLM | NativeTensors, dst: str | Path, *, overwrite: bool = False,
                side_files_from: Path | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:  # fmt: skip
    """Write ``model`` (a module, or its tensors as a stream) as a native directory, atomically. The
    weights are written tensor by tensor (``utils.io.write_safetensors``): no second copy of the model."""
    dst = Path(dst)
    if isinstance(model, NativeTensors):
        config, specs, tensors = model.config, native_tensor_specs(model.config, model.dtype), model.tensors
        num_params = sum(num_parameters(config).values())  # from the shapes, as a built model counts them
    else:
        state = model.state_dict()
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
        tensors = ((k, state[k]) for k in safetensors_order(specs))
        config, num_params = model.config, model.num_parameters()
    dtypes = sorted({str(d).replace("torch.", "") for d, _ in specs.values()})
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, specs, tensors, metadata={"format": "pt"})
        write_json(tmp / META_FILE, {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": config.to_dict(),
            "num_parameters": num_params,
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        })  # fmt: skip
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        for name, content in (extra_files or {}).items():  # e.g. architecture.json of an extracted child
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
    return dst


def read_native_config(src: str | Path) -> HybridConfig:
    meta = read_json(Path(src) / META_FILE, "model metadata")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(src)!r}: {META_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(src)!r}: format_version {meta.get('format_version')!r} is not supported by this "
            f"version (reads {FORMAT_VERSION}); upgrade megatron-elastic"
        )
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{str(src)!r}: {META_FILE} has no 'model' section")
    return HybridConfig.from_dict(meta["model"], where=f"{src}/{META_FILE} model")


def load_native(src: str | Path, *, dtype: torch.dtype | None = torch.float32) -> HybridLM:
    src = Path(src)
    config = read_native_config(src)
    state = load_safetensors(src / WEIGHTS_FILE, dtype=dtype)
    model = HybridLM(config, init=False).to(dtype or stored_dtype(state))
    load_state_into(model, state, str(src))
    return model
