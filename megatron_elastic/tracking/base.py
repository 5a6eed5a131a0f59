"""The tracker interface and the fan-out to several backends (the backends themselves are built in
:mod:`megatron_elastic.tracking.factory`, so this module names none of them)."""

from __future__ import annotations

from pathlib import Path


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker:
    """What the trainer reports. Backends override what they support; all calls are cheap."""

    def start(self, *, run_dir: Path, config: dict, resumed: bool, total_steps: int, start_step: int) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's files) under ``artifact_path`` (None = the top level)."""

    def message(self, text: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MultiTracker(Tracker):
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def start(self, **kw) -> None:
        for t in self.trackers:
            t.start(**kw)

    def log_metrics(self, metrics, step) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path=None) -> None:
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def message(self, text) -> None:
        for t in self.trackers:
            t.message(text)

    def finish(self, status="FINISHED") -> None:
        for t in self.trackers:
            t.finish(status)

