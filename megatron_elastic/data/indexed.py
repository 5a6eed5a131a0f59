"""Megatron indexed datasets: token documents in a ``PREFIX.bin`` / ``PREFIX.idx`` pair.

The files are written by megatron-core's own ``IndexedDatasetBuilder``
(``megatron.core.datasets.indexed_dataset``), so megatron-core's ``IndexedDataset`` and everything
built on it (``GPTDataset``, blended datasets) read them unchanged. megatron-core is imported only
inside :func:`write_indexed` because importing it takes seconds.

Reading goes through :class:`IndexedTokens`, a small NumPy reader of the same format, so training
and evaluation need neither megatron-core nor its import time. The format (little-endian)::

    PREFIX.idx  b"MMIDIDX\\x00\\x00"  u64 version (1)  u8 dtype code  u64 sequence count S
                u64 document count D+1  i32[S] sequence lengths  i64[S] byte offsets into .bin
                i64[D+1] document boundaries (sequence indices, starting at 0)
    PREFIX.bin  the tokens of every sequence, back to back, in the dtype of the code
                (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)

Every document written here is one sequence. A ``PREFIX.meta.json`` written next to the pair
records the tokenizer and counts; megatron-core ignores it.

Files are written under temporary hidden names in the output directory and renamed into place
only when all of them are complete, so an interrupted write never leaves a half-written pair.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from megatron_elastic.errors import UserError
from megatron_elastic.utils.io import fsync_path

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron-core's DType codes.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
META_SUFFIX = ".meta.json"
META_FORMAT = "megatron-elastic-indexed"


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}{META_SUFFIX}")


def dataset_files(prefix: str | os.PathLike) -> list[Path]:
    """The files of one dataset prefix: .bin, .idx and the metadata."""
    return [bin_path(prefix), idx_path(prefix), meta_path(prefix)]


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype megatron-core would use for token ids below ``vocab_size``."""
    # Same threshold as megatron-core's DType.optimal_dtype.
    return np.uint16 if vocab_size < 65500 else np.int32


def exists(prefix: str | os.PathLike) -> bool:
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


# ---------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_files(paths: list[Path]):
    """Yield one temporary path per target; on success rename them all into place, else delete them.

    Temporary files are hidden siblings named ``.NAME.tmp-PID``; after a hard kill they may remain,
    and nothing reads them.
    """
    paths = [Path(p) for p in paths]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in paths]
    try:
        yield tmps
        for t in tmps:
            fsync_path(t)
        # .bin before .idx: a reader checks for the pair, and the index is what names the tokens.
        for t, p in zip(tmps, paths):
            os.replace(t, p)
        for parent in {p.parent for p in paths}:
            fsync_path(parent)
    except BaseException:
        for t in tmps:
            t.unlink(missing_ok=True)
        raise


def _megatron_indexed():
    """megatron-core's indexed_dataset module; its import warns about optional GPU packages we do not use."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    except ImportError as exc:
        raise UserError(
            f"megatron-core is needed to write Megatron datasets but cannot be imported ({exc}); "
            "install it with `pip install megatron-core==0.16.1`"
        ) from None
    return indexed_dataset


class IndexedBuilder:
    """megatron-core's IndexedDatasetBuilder over one temporary .bin/.idx pair, with counts."""

    def __init__(self, tmp_bin: Path, tmp_idx: Path, dtype):
        IndexedDatasetBuilder = _megatron_indexed().IndexedDatasetBuilder

        self.tmp_idx = tmp_idx
        self.dtype = np.dtype(dtype)
        self.limit = np.iinfo(self.dtype).max
        self.builder = IndexedDatasetBuilder(str(tmp_bin), dtype=self.dtype.type)
        self.documents = 0
        self.tokens = 0

    def add(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > self.limit):
            raise ValueError(
                f"token ids must lie in [0, {self.limit}] for dtype {self.dtype.name}; got [{arr.min()}, {arr.max()}]"
            )
        self.builder.add_document(arr.astype(self.dtype), [int(arr.size)])
        self.documents += 1
        self.tokens += int(arr.size)

    def finalize(self) -> None:
        self.builder.finalize(str(self.tmp_idx))

    # As a context manager it closes the half-written .bin when an error interrupts the writing.
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if not self.builder.data_file.closed:
            self.builder.data_file.close()


def write_indexed(
    prefix: str | os.PathLike,
    documents_token_ids: Iterable,
    dtype=None,
    *,
    vocab_size: int | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write documents (sequences of token ids) as ``prefix.bin`` / ``prefix.idx`` (+ ``.meta.json``).

    ``dtype`` defaults to :func:`token_dtype` of ``vocab_size``. Returns the counts
    ``{"prefix", "documents", "tokens", "dtype"}``; ``meta`` is merged into the metadata file.
    """
    if dtype is None:
        if vocab_size is None:
            raise ValueError("write_indexed needs dtype or vocab_size")
        dtype = token_dtype(vocab_size)
    targets = dataset_files(prefix)
    if not overwrite and any(p.exists() for p in targets):
        raise UserError(f"dataset {os.fspath(prefix)!r} already exists; choose a new output prefix or pass --overwrite")
    with atomic_files(targets) as (tmp_bin, tmp_idx, tmp_meta):
        with IndexedBuilder(tmp_bin, tmp_idx, dtype) as builder:
            for ids in documents_token_ids:
                builder.add(ids)
            builder.finalize()
        summary = {"prefix": os.fspath(prefix), "documents": builder.documents, "tokens": builder.tokens,
                   "dtype": builder.dtype.name}  # fmt: skip
        write_meta(tmp_meta, {**(meta or {}), **summary})
    return summary


def write_meta(path: Path, data: dict) -> None:
    payload = {"format": META_FORMAT, "format_version": 1, **data}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- reading
class IndexedTokens:
    """Read-only view of a ``prefix.bin`` / ``prefix.idx`` pair (memory-mapped, nothing loaded)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        missing = [p.name for p in (bpath, ipath) if not p.is_file()]
        if missing:
            raise UserError(
                f"dataset {self.prefix!r} is missing {' and '.join(missing)}; "
                "pass the prefix of files written by `megatron-elastic data preprocess`"
            )
        raw = ipath.read_bytes()
        fixed = len(INDEX_HEADER) + 8 + 1 + 8 + 8
        if len(raw) < fixed or raw[: len(INDEX_HEADER)] != INDEX_HEADER:
            raise UserError(f"{str(ipath)!r} is not a Megatron index file; re-run `megatron-elastic data preprocess`")
        version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, len(INDEX_HEADER))
        if version != 1 or code not in DTYPE_CODES:
            raise UserError(f"{str(ipath)!r} has unsupported version {version} or dtype code {code}; re-run preprocess")
        need = fixed + n_seq * 4 + n_seq * 8 + n_doc * 8
        if len(raw) < need:
            raise UserError(
                f"{str(ipath)!r} is truncated ({len(raw)} of {need} bytes); re-run `megatron-elastic data preprocess`"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        off = fixed
        self.sizes = np.frombuffer(raw, np.int32, n_seq, off)
        off += n_seq * 4
        self.pointers = np.frombuffer(raw, np.int64, n_seq, off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(raw, np.int64, n_doc, off)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        expected = self.num_tokens * self.dtype.itemsize
        actual = bpath.stat().st_size
        if actual != expected:
            raise UserError(
                f"{str(bpath)!r} holds {actual} bytes but its index describes {expected}; the pair is truncated or "
                "mismatched: re-run `megatron-elastic data preprocess`"
            )
        # np.memmap refuses empty files; an empty dataset is still a valid (if useless) one.
        self.tokens = np.memmap(bpath, dtype=self.dtype, mode="r") if actual else np.empty(0, self.dtype)
        starts = self.pointers // self.dtype.itemsize
        ends = np.cumsum(self.sizes, dtype=np.int64)
        self.contiguous = bool(np.array_equal(starts, ends - self.sizes))
        self._starts = starts

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        i = range(len(self))[i]
        start = int(self._starts[i])
        return np.array(self.tokens[start : start + int(self.sizes[i])])

    @property
    def meta(self) -> dict:
        """The ``.meta.json`` written with the pair, or ``{}`` for files from elsewhere."""
        path = meta_path(self.prefix)
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}


def open_megatron(prefix: str | os.PathLike):
    """megatron-core's own ``IndexedDataset`` over the same files (imports megatron-core)."""
    if not exists(prefix):
        raise UserError(f"dataset {os.fspath(prefix)!r} is missing its .bin or .idx file; pass a preprocessed prefix")
    return _megatron_indexed().IndexedDataset(os.fspath(prefix))


class Progress:
    """Prints documents, tokens and MB at most every ``every`` seconds (and once at the end)."""

    def __init__(self, what: str, log, every: float = 5.0):
        self.what, self.log, self.every = what, log, every
        self.start = self.last = time.perf_counter()
        self.documents = self.tokens = self.bytes = 0

    def update(self, documents: int, tokens: int, nbytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += nbytes
        now = time.perf_counter()
        if self.log is not None and now - self.last >= self.every:
            self.last = now
            self.log(self.line())

    def line(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.what}: {self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:.1f} MB "
                f"in {dt:.1f} s ({self.bytes / 1e6 / dt:.1f} MB/s)")  # fmt: skip
