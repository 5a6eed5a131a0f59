"""Atomic directory writes, safetensors reading (whole files, or blocks of tensors on demand) with
user-facing errors, and a streaming safetensors writer."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
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


@contextlib.contextmanager
def _reading(path: Path):
    """``safe_open(path)``; a missing, truncated or corrupt file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} is missing; point at a complete checkpoint directory")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"weights file {str(path)!r} cannot be read ({str(exc).splitlines()[0]}); it is truncated or "
            "corrupt: copy it again or re-run the conversion"
        ) from None


def safetensors_keys(path: Path) -> list[str]:
    """The tensor keys of one safetensors file (its header only)."""
    with _reading(path) as f:
        return list(f.keys())


def load_safetensors(path: Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of one safetensors file; a truncated or corrupt file is a CheckpointError."""
    out = {}
    with _reading(path) as f:
        for key in f.keys():
            t = f.get_tensor(key)
            out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


# safetensors' dtype names, in the order its writer places tensors in the file (this dtype order,
# descending, then by name): U64 first, BOOL last.
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
    torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}  # fmt: skip
_DTYPE_RANK = {d: i for i, d in enumerate(_SAFETENSORS_DTYPES)}
TensorSpecs = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # name -> (dtype, shape)


def safetensors_order(specs: TensorSpecs) -> list[str]:
    """The order in which a safetensors file holds the tensors of ``specs`` (and its writer wants them)."""
    return sorted(specs, key=lambda n: (-_DTYPE_RANK[specs[n][0]], n))


def write_safetensors(path: Path, specs: TensorSpecs, tensors: Iterable[tuple[str, torch.Tensor]], *,
                      metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    """Write one safetensors file from a stream: the header from ``specs`` first, then each tensor's bytes
    as ``tensors`` yields ``(name, tensor)`` in :func:`safetensors_order`. Only the tensor being written
    is held (the caller's stream decides what else lives), so a producer can assemble the next tensor
    after the last one was written and freed. The file equals ``safetensors.torch.save_file`` of the
    same tensors byte for byte. ``tensors`` is exhausted, so a collective producer runs to its end."""
    order = safetensors_order(specs)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    stream = iter(tensors)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            got, tensor = next(stream, (None, None))
            assert got == name, f"tensor stream gave {got!r} where {name!r} comes next"
            dtype, shape = specs[name]
            assert tensor.dtype == dtype and tuple(tensor.shape) == shape, (name, tensor.dtype, tuple(tensor.shape))
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # before the producer makes the next one
        assert next(stream, None) is None, "tensor stream gave more tensors than the header lists"


class TensorFiles:
    """Named tensors of safetensors files, read on demand: a block of a tensor (slices along its leading
    dims) is read through a memory map, so a reader holds only the blocks it asks for.

    Each read maps its file for that read alone: while a mapping lives, every page read through it
    counts in the process's resident memory, so one long-lived mapping would hold all pages read so far.
    """

    def __init__(self, entries: dict[str, tuple[Path, str]]):
        """``entries``: tensor name -> (safetensors file, key of the tensor in that file)."""
        self.entries = dict(entries)
        self.shapes: dict[str, tuple[int, ...]] = {}
        """Tensor name -> shape, from the files' headers."""
        for path in sorted({path for path, _ in self.entries.values()}):
            with _reading(path) as f:
                stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            for name, (p, key) in self.entries.items():
                if p == path:
                    if key not in stored:
                        raise CheckpointError(f"weights file {str(path)!r} has no tensor {key!r}; the checkpoint "
                                              "is incomplete: copy it again or re-run the conversion")  # fmt: skip
                    self.shapes[name] = stored[key]

    def read_into(self, name: str, block: tuple[slice, ...], out: torch.Tensor) -> None:
        """Copy ``tensor[block]`` of tensor ``name`` into ``out`` (cast to its dtype)."""
        path, key = self.entries[name]
        with _reading(path) as f:
            view = f.get_slice(key)[block] if block else f.get_tensor(key)  # a view of the mapped file
        out.copy_(view)
        del view  # the last reference to the mapping: its pages leave this process


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
