"""Build the trackers a run config names: the one module that knows the backends."""

from __future__ import annotations

from megatron_elastic.tracking.base import MultiTracker, Tracker


def build_trackers(cfg, *, enabled: bool = True) -> MultiTracker:
    """Trackers named in ``cfg.tracking.backends`` (a RunConfig).

    ``enabled=False`` gives an empty fan-out: in a distributed run only one rank reports (the
    first rank of the last pipeline stage, which holds the loss); the others pass False."""
    trackers: list[Tracker] = []
    if not enabled:
        return MultiTracker(trackers)
    for name in cfg.tracking.backends:
        if name == "console":
            from megatron_elastic.tracking.console import ConsoleTracker

            trackers.append(ConsoleTracker())
        elif name == "mlflow":
            from megatron_elastic.tracking.mlflow_backend import MLflowTracker

            trackers.append(MLflowTracker(cfg.tracking))
    return MultiTracker(trackers)
