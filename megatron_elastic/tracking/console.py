"""Console tracker: a progress line with ETA every log interval, and validation lines."""

from __future__ import annotations

import sys
import time

from megatron_elastic.tracking.base import Tracker


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ConsoleTracker(Tracker):
    """Prints ``[#####-----]  40% step 120/300 | loss ... | ETA 1m20s``; never raises."""

    def __init__(self, stream=None, width: int = 20):
        self.stream = stream or sys.stdout
        self.width = width
        self.total = 0
        self.start_step = 0
        self.t0 = time.perf_counter()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, *, run_dir, config, resumed, total_steps, start_step) -> None:
        self.total, self.start_step, self.t0 = total_steps, start_step, time.perf_counter()
        what = f"resuming at step {start_step}" if resumed else "starting"
        self._print(f"[train] {what}; {total_steps} steps; run directory {run_dir}")

    def log_metrics(self, metrics, step) -> None:
        if "val_loss" in metrics:
            extra = "".join(f" | {k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_") and k != "val_loss")
            self._print(f"[valid] step {step} | val_loss {metrics['val_loss']:.4f}{extra}")
            return
        if "loss" not in metrics:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        frac = step / self.total if self.total else 1.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        parts = [f"loss {metrics['loss']:.4f}"]
        for key, fmt in (("lr", ".2e"), ("grad_norm", ".3f"), ("tokens_per_s", ".0f"), ("tau", ".3f")):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:{fmt}}")
        # per-budget numbers of an elastic run, e.g. kd_loss/b0.75 and cost/b0.75
        per_budget = [f"{k} {v:.3f}" for k, v in metrics.items() if "/" in k and k.split("/")[0] in ("kd_loss", "cost")]
        parts.extend(per_budget)
        self._print(f"[{bar}] {100 * frac:5.1f}% step {step}/{self.total} | " + " | ".join(parts) + f" | ETA {_duration(eta)}")

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def message(self, text: str) -> None:
        self._print(text)

    def finish(self, status="FINISHED") -> None:
        self._print(f"[train] {status.lower()} after {_duration(time.perf_counter() - self.t0)}")
