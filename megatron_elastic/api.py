"""Public Python entry points."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_elastic.errors import CheckpointError


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """Load a native megatron-elastic directory or a Hugging Face ``nemotron_h`` directory.

    Returns a :class:`~megatron_elastic.model.HybridLM` in eval mode; ``model(tokens)`` maps a
    LongTensor ``(batch, length)`` to float logits ``(batch, length, vocab)``. ``dtype=None`` keeps
    the stored dtype.
    """
    from megatron_elastic.convert.hf import is_hf_dir, load_hf
    from megatron_elastic.convert.native import is_native_dir, load_native

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory; give a native or Hugging Face model directory")
    if is_native_dir(path):
        model = load_native(path, dtype=dtype)
    elif is_hf_dir(path):
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
