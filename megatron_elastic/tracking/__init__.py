"""Experiment tracking: one interface, a console backend and an MLflow backend (imported lazily)."""

from megatron_elastic.tracking.base import MultiTracker, Tracker, build_trackers, flatten

__all__ = ["MultiTracker", "Tracker", "build_trackers", "flatten"]
