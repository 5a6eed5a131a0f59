"""Graceful stop on SIGTERM / SIGUSR1: the trainer finishes its step, checkpoints and exits with
:data:`EXIT_REQUEUE` so a launcher (Slurm) knows to requeue the job, which then resumes."""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later".
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by a stop signal; polled once per optimizer step (never interrupts a step)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
