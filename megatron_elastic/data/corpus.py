"""The built-in corpus: the Python standard library's own ``.py`` source files.

Every machine that runs this package has a Python interpreter, so its standard library is a text
corpus that needs no download. It is the source tree at ``sysconfig.get_paths()["stdlib"]`` of the
running interpreter, walked without following symbolic links.

Included: every regular, non-empty file ending in ``.py`` under that directory, except:

- third-party code: any path with a ``site-packages`` or ``dist-packages`` component;
- test suites and their data: any path with a ``test``, ``tests`` or ``idle_test`` component
  (``test/``, ``unittest/test/``, ``ctypes/test/``, ``tkinter/test/``, ``lib2to3/tests/``,
  ``distutils/tests/``, ``idlelib/idle_test/``, ...);
- the IDLE application: any path with an ``idlelib`` component;
- generated data dressed as source: the ``encodings/`` package (mostly generated character-map
  tables), ``pydoc_data/`` (one large string of documentation text), the build's
  ``config-*`` directory and ``_sysconfigdata_*.py`` (build settings of this one machine);
- byte-code caches (``__pycache__``).

Files are ordered by their POSIX path relative to the stdlib directory. The split is a pure
function of that relative path: a file is in ``valid`` when the first 8 bytes of
``sha1(relative_path)``, as an integer divided by 2**64, are below :data:`VALID_FRACTION` (5%),
and in ``train`` otherwise. So the split never depends on which other files exist.

``max_bytes`` caps a split deterministically: files are taken in the order of their sha1 (a fixed
pseudo-random order, so a capped corpus samples the whole library rather than its first letters),
each one added while the running total of file sizes stays within the cap; the kept files are then
returned in path order.

Documents are the files' texts decoded as UTF-8; a file that is not valid UTF-8 is skipped (the
same files on every run, since the check depends only on the file's bytes).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from megatron_elastic.errors import UserError

SPLITS = ("train", "valid")
VALID_FRACTION = 0.05
# Any path component in this set excludes the file (see the module docstring for why).
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "encodings",
        "pydoc_data",
        "__pycache__",
    }
)
EXCLUDED_DIR_PREFIXES = ("config-",)
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata_",)


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def describe_corpus() -> str:
    """One paragraph saying exactly what the built-in corpus is (for logs, ``--help`` and reports)."""
    return (
        f"built-in corpus: the non-empty .py files under {stdlib_root()} (the running Python's standard library), "
        f"excluding any path with a component in {{{', '.join(sorted(EXCLUDED_DIRS))}}} or starting with "
        f"{', '.join(EXCLUDED_DIR_PREFIXES)}, and files named {', '.join(p + '*' for p in EXCLUDED_FILE_PREFIXES)}; "
        f"ordered by relative path; split by sha1(relative path): {VALID_FRACTION:.0%} valid, the rest train; "
        "files that are not valid UTF-8 are skipped"
    )


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")


def split_of(rel: str) -> str:
    """``"valid"`` or ``"train"`` for a POSIX path relative to the stdlib directory."""
    return "valid" if _path_hash(rel) < VALID_FRACTION * 2**64 else "train"


def _excluded(rel_parts: tuple[str, ...]) -> bool:
    dirs, name = rel_parts[:-1], rel_parts[-1]
    if any(d in EXCLUDED_DIRS or d.startswith(EXCLUDED_DIR_PREFIXES) for d in dirs):
        return True
    return name.startswith(EXCLUDED_FILE_PREFIXES)


def _all_files(root: Path) -> list[tuple[str, int]]:
    """(relative POSIX path, size in bytes) of every included file, sorted by path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).parts
        # Prune excluded directories early: site-packages alone is often ten times the stdlib.
        dirnames[:] = [d for d in dirnames if not (d in EXCLUDED_DIRS or d.startswith(EXCLUDED_DIR_PREFIXES))]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            parts = (*rel_dir, name)
            if _excluded(parts):
                continue
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            size = path.stat().st_size
            if size > 0:
                out.append(("/".join(parts), size))
    out.sort()
    return out


def corpus_files(split: str, *, max_bytes: int | None = None, root: Path | None = None) -> list[tuple[str, int]]:
    """(relative path, size) of the files of one split, in path order, capped at ``max_bytes``."""
    if split not in SPLITS:
        raise UserError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    if max_bytes is not None and max_bytes <= 0:
        raise UserError(f"max_bytes must be positive (got {max_bytes}); pass a byte count or None for no cap")
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise UserError(f"the standard library directory {str(root)!r} does not exist; run with a full Python install")
    files = [(rel, size) for rel, size in _all_files(root) if split_of(rel) == split]
    if max_bytes is not None:
        kept, total = [], 0
        for rel, size in sorted(files, key=lambda f: (_path_hash(f[0]), f[0])):
            if total + size <= max_bytes:
                kept.append((rel, size))
                total += size
        files = sorted(kept)
    if not files:
        raise UserError(
            f"the built-in corpus split {split!r} is empty under {str(root)!r} (max_bytes={max_bytes}); "
            "raise max_bytes or use a Python install with its standard library"
        )
    return files


def builtin_corpus(split: str, *, max_bytes: int | None = None, root: Path | None = None) -> list[Path]:
    """Absolute paths of the files of one split (``"train"`` or ``"valid"``), in relative-path order."""
    root = stdlib_root() if root is None else Path(root)
    return [root / rel for rel, _ in corpus_files(split, max_bytes=max_bytes, root=root)]


def iter_documents(paths: list[Path]) -> Iterator[str]:
    """The UTF-8 text of each file, in order; files that are not valid UTF-8 are skipped."""
    for path in paths:
        try:
            yield Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue


def builtin_documents(split: str, *, max_bytes: int | None = None, root: Path | None = None) -> Iterator[str]:
    """The document texts of one split of the built-in corpus."""
    return iter_documents(builtin_corpus(split, max_bytes=max_bytes, root=root))


def corpus_fingerprint(split: str, *, max_bytes: int | None = None, root: Path | None = None) -> str:
    """sha256 over the split's (relative path, size) list: changes when the corpus would change."""
    h = hashlib.sha256()
    for rel, size in corpus_files(split, max_bytes=max_bytes, root=root):
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()
