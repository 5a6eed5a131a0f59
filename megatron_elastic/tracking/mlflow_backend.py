"""MLflow tracker (``mlflow`` is imported only when this backend is used).

By default it writes to an embedded store inside the run directory (``sqlite:///RUN_DIR/mlflow.db``,
artifacts under ``RUN_DIR/mlartifacts``); ``tracking.mlflow_uri`` points it at a server. A resumed
run continues the same MLflow run (its id is kept in ``RUN_DIR/mlflow_run.json``). Tracking never
stops training: a failing call is reported once and the backend goes quiet.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

from megatron_elastic.tracking.base import Tracker, flatten

_PARAM_VALUE_LIMIT = 6000  # MLflow's maximum param value length


def redact(uri: str) -> str:
    """Hide credentials in a tracking URI: ``https://user:pw@host`` -> ``https://***@host``."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


class MLflowTracker(Tracker):
    def __init__(self, tracking_cfg):
        self.cfg = tracking_cfg
        self.client = None
        self.run_id: str | None = None
        self.disabled = False

    def _fail(self, what: str, exc: Exception) -> None:
        if not self.disabled:
            print(f"[mlflow] {what} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                  "training continues without MLflow", file=sys.stderr, flush=True)  # fmt: skip
        self.disabled = True

    def start(self, *, run_dir, config, resumed, total_steps, start_step) -> None:
        run_dir = Path(run_dir).resolve()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import mlflow
                from mlflow.tracking import MlflowClient
            uri = self.cfg.mlflow_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
            self.client = MlflowClient(tracking_uri=uri)
            id_file = run_dir / "mlflow_run.json"
            if id_file.is_file():
                self.run_id = json.loads(id_file.read_text())["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                exp = self.client.get_experiment_by_name(self.cfg.experiment)
                if exp is None:
                    location = None if self.cfg.mlflow_uri else (run_dir / "mlartifacts").as_uri()
                    exp_id = self.client.create_experiment(self.cfg.experiment, artifact_location=location)
                else:
                    exp_id = exp.experiment_id
                run = self.client.create_run(exp_id, run_name=self.cfg.run_name or run_dir.name)
                self.run_id = run.info.run_id
                id_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": redact(uri)}))
                params = {k: str(v)[:_PARAM_VALUE_LIMIT] for k, v in flatten(config).items()}
                items = [mlflow.entities.Param(k, v) for k, v in params.items()]
                for i in range(0, len(items), 100):  # MLflow's batch limit
                    self.client.log_batch(self.run_id, params=items[i : i + 100])
            print(f"[mlflow] run {self.run_id} at {redact(uri)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("start", exc)

    def log_metrics(self, metrics, step) -> None:
        if self.disabled or self.client is None:
            return
        try:
            from mlflow.entities import Metric
            import time

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:  # noqa: BLE001
            self._fail("log_metrics", exc)

    def log_artifact(self, path) -> None:
        if self.disabled or self.client is None:
            return
        try:
            self.client.log_artifact(self.run_id, str(path))
        except Exception as exc:  # noqa: BLE001
            self._fail("log_artifact", exc)

    def finish(self, status="FINISHED") -> None:
        if self.disabled or self.client is None:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)
