"""Graceful stop on SIGTERM / SIGUSR1, from the first instant of a training command to its last:

* during start-up (reading the config, tokenizing, building, loading the parent) a stop raises
  :class:`StopRequested`; the command exits with :data:`EXIT_REQUEUE` having written nothing that
  matters (every output is atomic), so the requeued job starts clean;
* in the training loop the trainer finishes its step, checkpoints and exits with
  :data:`EXIT_REQUEUE` so a launcher (Slurm) knows to requeue the job, which then resumes;
* after the last step the run is complete: a stop is ignored and the command exits 0."""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later".
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(BaseException):
    """A stop signal during start-up. A BaseException, so that no ``except Exception`` on the way
    swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _stop_now(signum, frame) -> None:
    raise StopRequested(signum)


def _finished(signum, frame) -> None:
    """After the loop: the run has reached its last step; requeueing it would redo nothing."""


def stop_during_setup() -> None:
    """From now until the training loop starts, a stop signal raises :class:`StopRequested`."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_now)


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
        """Back to the handlers before :meth:`install`, except that start-up's raising handler is not
        restored: what follows the loop (the final export) ends the run, a stop there is ignored."""
        for sig, handler in self._previous.items():
            signal.signal(sig, _finished if handler is _stop_now else handler)
        self._previous.clear()
