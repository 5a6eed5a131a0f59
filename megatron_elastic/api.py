"""Public Python entry points."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_elastic.errors import CheckpointError


def model_format(path: str | Path) -> str | None:
    """'native', 'hf' (a nemotron_h directory) or None."""
    from megatron_elastic.convert.hf import is_hf_dir
    from megatron_elastic.convert.native import is_native_dir

    path = Path(path)
    if is_native_dir(path):
        return "native"
    return "hf" if is_hf_dir(path) else None


def read_model_config(path: str | Path, *, what: str = "checkpoint"):
    """The :class:`HybridConfig` of a native or Hugging Face model directory, without reading weights."""
    from megatron_elastic.convert.hf import config_from_hf
    from megatron_elastic.convert.native import read_native_config
    from megatron_elastic.utils.io import read_json

    path = Path(path)
    fmt = model_format(path)
    if fmt == "native":
        return read_native_config(path)
    if fmt == "hf":
        return config_from_hf(read_json(path / "config.json", "Hugging Face config"), src=str(path))
    raise _not_a_model(path, what)


def _not_a_model(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{what} {str(path)!r} is not a native or Hugging Face model directory (no "
                           "megatron_elastic.json, no nemotron_h config.json); point at a model directory")  # fmt: skip


def open_weights(path: str | Path, *, what: str = "checkpoint"):
    """The tensors of a native or Hugging Face model directory under their native names, read on demand:
    a :class:`~megatron_elastic.utils.io.TensorFiles` (blocks of a tensor through a memory map)."""
    from megatron_elastic.convert.hf import hf_tensor_files
    from megatron_elastic.convert.native import native_tensor_files

    fmt = model_format(path)
    if fmt == "native":
        return native_tensor_files(path)
    if fmt == "hf":
        return hf_tensor_files(path)
    raise _not_a_model(Path(path), what)


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """Load a native megatron-elastic directory or a Hugging Face ``nemotron_h`` directory.

    Returns a :class:`~megatron_elastic.model.HybridLM` in eval mode; ``model(tokens)`` maps a
    LongTensor ``(batch, length)`` to float logits ``(batch, length, vocab)``. ``dtype=None`` keeps
    the stored dtype.
    """
    from megatron_elastic.convert.hf import load_hf
    from megatron_elastic.convert.native import load_native

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory; give a native or Hugging Face model directory")
    fmt = model_format(path)
    if fmt == "native":
        model = load_native(path, dtype=dtype)
    elif fmt == "hf":
        model = load_hf(path, dtype=dtype)
    elif (path / "config.json").is_file():
        raise CheckpointError(
            f"{str(path)!r} has a config.json that is not a nemotron_h model (model_type must be 'nemotron_h')"
        )
    else:
        raise CheckpointError(
            f"{str(path)!r} is neither a native model (no megatron_elastic.json) nor a Hugging Face "
            "model (no config.json); point at a model directory"
        )
    return model.eval()


def save_model(model, dst: str | Path, fmt: str = "native", *, overwrite: bool = False,
               side_files_from: Path | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:  # fmt: skip
    """Write ``model`` as a native (``fmt="native"``) or Hugging Face ``nemotron_h`` (``"hf"``) directory."""
    if fmt == "hf":
        from megatron_elastic.convert.hf import save_hf

        return save_hf(model, dst, overwrite=overwrite, side_files_from=side_files_from, extra_files=extra_files)
    from megatron_elastic.convert.native import save_native

    return save_native(model, dst, overwrite=overwrite, side_files_from=side_files_from, extra_files=extra_files)
