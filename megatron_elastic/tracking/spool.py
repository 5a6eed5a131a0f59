"""The local spool of tracking records that could not be delivered yet.

``RUN_DIR/mlflow_spool.jsonl`` holds one JSON record per line, oldest first, in the order the run
produced them (run creation, metrics of a step, tags, artifacts, status). Records are appended
while the tracking server is unreachable and removed from the front once delivered. Order matters:
new records are only sent directly while the spool is empty, so the server always receives a run's
records in the order they were made.

Two locks (``fcntl.flock``, released by the kernel if a process dies):

* ``mlflow_spool.lock`` guards the file itself for the moment of an append or a trim, so that a
  training process and ``megatron-elastic tracking sync`` never lose each other's lines;
* ``mlflow_replay.lock`` is held by whoever is replaying, so that two processes never send the same
  records at the same time (the other one keeps spooling).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

SPOOL_FILE = "mlflow_spool.jsonl"


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool = True):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Spool:
    """Append / read / drop-from-the-front of the record file of one run directory."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / SPOOL_FILE
        self._lock = Path(run_dir) / "mlflow_spool.lock"
        self._replay_lock = Path(run_dir) / "mlflow_replay.lock"

    def __len__(self) -> int:
        return len(self.read())

    def is_empty(self) -> bool:
        # A stat, not a read: this is asked before every record while the server is healthy.
        try:
            return self.path.stat().st_size == 0
        except FileNotFoundError:
            return True

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with _flock(self._lock), open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        """Every complete record, oldest first (a line cut by a kill is ignored)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def drop_first(self, n: int) -> None:
        """Remove the ``n`` oldest records (delivered); records appended meanwhile stay."""
        if n <= 0:
            return
        with _flock(self._lock):
            try:
                lines = [x for x in self.path.read_text().splitlines() if x.strip()]
            except FileNotFoundError:
                return
            kept = []
            for line in lines:  # count complete records only, as read() does
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    continue
                if n > 0:
                    n -= 1
                    continue
                kept.append(line)
            if not kept:
                self.path.unlink(missing_ok=True)
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in kept))
            os.replace(tmp, self.path)

    def replay_lock(self):
        """Context manager yielding True when this process may replay now (non-blocking)."""
        return _flock(self._replay_lock, blocking=False)
