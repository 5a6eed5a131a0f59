"""Experiment tracking: one interface, a console backend and an MLflow backend (imported lazily)."""

from megatron_elastic.tracking.base import MultiTracker, Tracker, flatten
from megatron_elastic.tracking.factory import build_trackers

__all__ = ["MultiTracker", "Tracker", "build_trackers", "flatten"]
