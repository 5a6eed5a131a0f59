"""Atomic directory writes and safetensors reading with user-facing errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_elastic.errors import CheckpointError, UserError


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before a rename publishes it)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def check_writable(path: str | os.PathLike, what: str, *, kind: str = "directory") -> None:
    """Refuse (UserError), before any work, an output ``path`` that could not be written: an existing
    ``path`` of the other kind (a file where a ``kind="directory"`` goes, or the reverse), or a nearest
    existing ancestor that is a file or not writable. Missing parents are fine (they are created)."""
    path = Path(path)
    if path.exists() and path.is_dir() != (kind == "directory"):
        have = "a directory" if path.is_dir() else "a file"
        raise UserError(f"{what} {str(path)!r} is {have}, not a {kind}; choose another path")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {str(path)!r} cannot be created: {str(ancestor)!r} is a file, not a directory; "
                        "choose another path")  # fmt: skip
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} cannot be created: {str(ancestor)!r} is not writable; choose "
                        "another path or fix its permissions")  # fmt: skip


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary directory next to ``dst``; on success fsync it and rename it to ``dst``.

    A crash or exception leaves ``dst`` untouched (the temporary directory is removed on
    exceptions; after a hard kill it remains as ``.<name>.tmp-*`` and is never read).
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise UserError(f"output directory {str(dst)!r} already exists; choose a new path or remove it")
    check_writable(dst, "output directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if dst.exists():
            # Keep the old directory until the new one is in place.
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
        fsync_path(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} is missing; point at a complete checkpoint directory")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5,000-digit number, nesting past the stack
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON ({why}); the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(path)!r} must hold a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_safetensors(path: Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of one safetensors file; a truncated or corrupt file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} is missing; point at a complete checkpoint directory")
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"weights file {str(path)!r} cannot be read ({str(exc).splitlines()[0]}); it is truncated or "
            "corrupt: copy it again or re-run the conversion"
        ) from None
    return out


def contained_path(root: Path, name: object, what: str) -> Path:
    """``root / name`` for a file name read from a file in ``root``, refused (CheckpointError) unless it
    is a plain relative path that stays inside ``root``: such names must never reach other files."""
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{str(root)!r}: {what} {str(name)[:80]!r} is not a file name; the file listing it is corrupt")
    candidate = Path(name)
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or ".." in candidate.parts or not resolved.is_relative_to(root.resolve()):
        raise CheckpointError(f"{str(root)!r}: {what} {name[:80]!r} points outside the directory; refusing to read "
                              "it (only names inside the directory are allowed)")  # fmt: skip
    return root / candidate
