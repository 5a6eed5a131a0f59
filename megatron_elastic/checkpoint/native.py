"""Training checkpoints: atomic, complete, and exactly resumable.

Layout (under ``RUN_DIR/checkpoints``)::

    step_00000100/
      megatron_elastic.json, model.safetensors   the model as a native directory (load_pretrained reads it)
      optimizer.pt        optimizer state (AdamW moments and step counts)
      trainer_state.json  step, consumed samples, data-loader position, metrics-file offset
      rng.pt              Python, NumPy, torch CPU (and CUDA) generator states
      config.yaml         the fully resolved run config
      manifest.json       written last: every other file's size and SHA-256
    latest                the name of the newest complete checkpoint (replaced atomically)

Each ``step_*`` directory is written to a temporary sibling, fsynced and renamed; ``latest`` is
updated only after that, and older checkpoints beyond ``keep_last`` are deleted only after it.
A run killed at any instant therefore resumes from a complete checkpoint; one damaged afterwards
(truncated by a full disk, a file lost or altered) fails its manifest, and resume falls back to the
newest older checkpoint that verifies, saying so in one line.

Parallel runs (``launch/train.py``) write the model and optimizer through megatron-core
``dist_checkpointing`` instead (``common.pt``, ``metadata.json``, ``.metadata``, one ``*.distcp`` per
rank; see :mod:`megatron_elastic.checkpoint.dist`) next to the same small files.
:func:`megatron_elastic.checkpoint.dist.load_checkpoint` reads either format, so one process resumes a
parallel run and back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from megatron_elastic.convert.native import WEIGHTS_FILE, load_state_into, read_native_config
from megatron_elastic.errors import CheckpointError, shown
from megatron_elastic.utils.io import atomic_directory, fsync_path, load_safetensors, read_json, write_json

LATEST = "latest"
FILES = ("megatron_elastic.json", WEIGHTS_FILE, "optimizer.pt", "trainer_state.json", "rng.pt", "config.yaml")
# What megatron-core's dist_checkpointing writes (plus the small files every checkpoint has).
DIST_FILES = ("megatron_elastic.json", "trainer_state.json", "config.yaml", "metadata.json", "common.pt", ".metadata")


def is_dist_checkpoint(path: Path) -> bool:
    """Written by a parallel run through megatron-core dist_checkpointing (else the single-process format)."""
    return any((path / name).is_file() for name in ("metadata.json", "common.pt", ".metadata"))


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


# What an RNG state needs beyond tensors and plain containers: NumPy's generator state holds an array.
_NUMPY_ARRAY = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def load_torch_state(path: Path, *, mmap: bool = False):
    """An optimizer or RNG state written with ``torch.save``, read with ``weights_only=True``: tensors,
    numbers, strings and containers, and NumPy's array reconstruction; any other global in the file
    (code that a checkpoint received from elsewhere could run) fails with ``pickle.UnpicklingError``.
    ``mmap``: tensors stay on disk (mapped, not read), so checking a file costs its pickle only."""
    with torch.serialization.safe_globals(list(_NUMPY_ARRAY)):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def unreadable_state_error(path: Path, name: str, exc: BaseException) -> CheckpointError:
    """The one-line error for an optimizer or RNG file that cannot be read safely."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        why = "holds objects other than tensors and plain values (refused: unpickling them could run code)"
    else:
        why = f"is unreadable ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]})"
    return CheckpointError(f"checkpoint {str(path)!r}: {name} {why}; it is corrupt or was not written by "
                           "megatron-elastic: resume from an older step_* directory or start a new run_dir")  # fmt: skip


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, *, unhashed: tuple[str, ...] = ()) -> None:
    """``manifest.json`` in ``directory``: every file's size and SHA-256 (sizes only for names ending
    in ``unhashed``: a sharded run's per-rank tensor files, too large to read back on one rank). Written
    last, so a directory with a manifest was complete."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = path.relative_to(directory).as_posix()
        files[name] = {"bytes": path.stat().st_size, **({} if name.endswith(unhashed) else {"sha256": _sha256(path)})}
    write_json(directory / MANIFEST, {"format": "megatron-elastic-manifest", "files": files})


_CHECKED: dict[tuple, str | None] = {}


def manifest_problem(path: Path) -> str | None:
    """Why ``path`` does not match its manifest (None: it does, or it predates manifests). Hashed once
    per process: a run's start-up checks and its trainer both look before resuming."""
    if not (path / MANIFEST).is_file():
        return None
    stat = (path / MANIFEST).stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = _manifest_problem(path)
    return _CHECKED[key]


def _manifest_problem(path: Path) -> str | None:
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        for name, want in files.items():
            file = path / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                return f"the manifest names {name[:80]!r}, outside the checkpoint"
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size:,} bytes, the manifest {int(want['bytes']):,}"
            if "sha256" in want and _sha256(file) != want["sha256"]:
                return f"{name} differs from the manifest (SHA-256)"
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        return f"its manifest is unreadable ({type(exc).__name__})"
    return None


def _write_pointer(ckpt_root: Path, name: str) -> None:
    tmp = ckpt_root / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_root / LATEST)
    fsync_path(ckpt_root)


def write_extra_files(directory: Path, extra: dict | None) -> None:
    """A trainer's extra checkpoint files, name -> value: str and bytes as they are, anything else
    with ``torch.save`` (tensors and plain values, so that :func:`load_torch_state` reads it)."""
    for name, value in (extra or {}).items():
        if isinstance(value, str):
            (directory / name).write_text(value)
        elif isinstance(value, bytes):
            (directory / name).write_bytes(value)
        else:
            torch.save(value, directory / name)


def save_checkpoint(ckpt_root: Path, *, step: int, model, optimizer, trainer_state: dict, config_yaml: str,
                    keep_last: int, extra: dict | None = None) -> Path:  # fmt: skip
    """``extra``: the trainer's own files (:func:`write_extra_files`)."""
    from safetensors.torch import save_file

    ckpt_root.mkdir(parents=True, exist_ok=True)
    dst = ckpt_root / step_dirname(step)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(dst, overwrite=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / "megatron_elastic.json", {
            "format": "megatron-elastic-model", "format_version": 1, "model": model.config.to_dict(),
            "num_parameters": model.num_parameters(), "dtype": "float32",
        })  # fmt: skip
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / "trainer_state.json", trainer_state)
        (tmp / "config.yaml").write_text(config_yaml)
        write_extra_files(tmp, extra)
        write_manifest(tmp)
    publish(ckpt_root, dst.name, keep_last)
    return dst


def publish(ckpt_root: Path, name: str, keep_last: int) -> None:
    """Point ``latest`` at the complete checkpoint ``name``, then prune old and stale ones."""
    _write_pointer(ckpt_root, name)
    # Prune only after the new checkpoint is complete and pointed to.
    prune_checkpoints(ckpt_root, keep_last)


def prune_checkpoints(ckpt_root: Path, keep_last: int, *, resumed: Path | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the temporary files of interrupted saves.
    After each save, and at start-up with ``resumed`` (the checkpoint a run resumes from): that finishes
    a save killed between moving ``latest`` and pruning. At start-up only when ``resumed`` is the newest
    checkpoint: after a fall-back to an older one nothing is deleted (the damaged newer ones stay for
    inspection, and counting them must not remove the one resumed)."""
    existing = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    if resumed is not None and (not existing or existing[-1].name != Path(resumed).name):
        return
    for old in existing[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".step_*.tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    for stale in ckpt_root.glob(f".{LATEST}.tmp-*"):  # a pointer write killed before its rename
        stale.unlink(missing_ok=True)


_WARNED: set[str] = set()


def latest_checkpoint(ckpt_root: Path, *, warn=None) -> Path | None:
    """The newest complete checkpoint that matches its manifest, or None when the run has none yet.
    When the one ``latest`` names is damaged, the newest older one that verifies is taken and ``warn``
    (default: stderr) hears one line naming the skipped one; none verifying is a CheckpointError."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    steps = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), reverse=True)
    if name.startswith("step_") and "/" not in name and (ckpt_root / name).is_dir():
        candidates = [ckpt_root / name, *(p for p in steps if p.name < name)]
        skipped = []
    else:
        candidates, skipped = steps, [f"{str(pointer)!r} names {name[:80]!r}, which is not a checkpoint directory"]
    for path in candidates:
        problem = manifest_problem(path)
        if problem is None:
            message = f"[checkpoint] skipped: {'; '.join(skipped)}; resuming from {str(path)!r} instead"
            if skipped and message not in _WARNED:  # once per process (the run's checks and its trainer both ask)
                import sys

                _WARNED.add(message)
                (warn or (lambda text: print(text, file=sys.stderr, flush=True)))(message)
            return path
        skipped.append(f"{str(path)!r} is damaged ({problem})")
    raise CheckpointError(f"no usable checkpoint in {str(ckpt_root)!r}: {'; '.join(skipped)[:400]}; restore one, "
                          "or start a new run_dir")  # fmt: skip


def validate_checkpoint(path: Path, model_config) -> None:
    """Cheap checks before any compute: every file present, metadata readable, same model shape."""
    for name in DIST_FILES if is_dist_checkpoint(path) else FILES:
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint {str(path)!r} lacks {name}; it is incomplete or corrupt: remove it and point "
                f"{LATEST!r} at an older step_* directory, or start a new run_dir"
            )
    saved, current = read_native_config(path).to_dict(), model_config.to_dict()
    if saved != current:
        diffs = [f"{k}: checkpoint {v!r} vs config {current[k]!r}" for k, v in saved.items() if current[k] != v]
        raise CheckpointError(
            f"cannot resume {str(path)!r} into a different model shape ({'; '.join(diffs[:3])}); "
            "use the checkpoint's model config or a new run_dir"
        )
    state = read_json(path / "trainer_state.json", "trainer state")
    for key in ("step", *(["consumed_samples"] if "consumed_samples" in state else [])):  # the counts resume reads
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"checkpoint {str(path)!r}: trainer_state.json has {key}={shown(value)}, not a "
                                  "count; it is corrupt: resume from an older step_* directory or start a new "
                                  "run_dir")  # fmt: skip
    if not is_dist_checkpoint(path):
        read_optimizer_and_rng(path, mmap=True)  # a garbage file fails here, before any data is prepared


def load_native(path: Path, *, model, optimizer) -> tuple[dict, dict]:
    """Restore model and optimizer in place from the single-process format; returns (trainer_state,
    rng_state). Validates first. :func:`megatron_elastic.checkpoint.dist.load_checkpoint` reads either format."""
    validate_checkpoint(path, model.config)
    trainer_state = read_json(path / "trainer_state.json", "trainer state")
    state = load_safetensors(path / WEIGHTS_FILE, dtype=torch.float32)
    load_state_into(model, state, str(path))
    opt_sd, rng = read_optimizer_and_rng(path)
    try:
        optimizer.load_state_dict(opt_sd)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise unreadable_state_error(path, "optimizer.pt", exc) from None
    return trainer_state, rng


def read_optimizer_and_rng(path: Path, *, mmap: bool = False) -> tuple[dict, dict]:
    """optimizer.pt and rng.pt of a single-process checkpoint, read safely (:func:`load_torch_state`)."""
    import pickle

    out = []
    for name in ("optimizer.pt", "rng.pt"):
        try:
            state = load_torch_state(path / name, mmap=mmap)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError) as exc:
            raise unreadable_state_error(path, name, exc) from None
        if not isinstance(state, dict):
            raise unreadable_state_error(path, name, ValueError(f"holds a {type(state).__name__}, not a dict"))
        out.append(state)
    return out[0], out[1]


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())
