"""MLflow tracker (``mlflow`` is imported only when this backend is used).

By default it writes to an embedded store inside the run directory (``sqlite:///RUN_DIR/mlflow.db``,
artifacts under ``RUN_DIR/mlartifacts``); ``tracking.mlflow_uri`` points it at a server. A resumed
or requeued run continues the same MLflow run (its id is kept in ``RUN_DIR/mlflow_run.json``).

Tracking never stops training. Every record (run creation, the metrics of a step, tags, an
artifact, the final status) goes through :class:`RunLink`: sent at once while the server answers;
otherwise appended to ``RUN_DIR/mlflow_spool.jsonl`` (:mod:`megatron_elastic.tracking.spool`) and
replayed, in order, when a later retry finds the server again, at the end of the run, or by
``megatron-elastic tracking sync RUN_DIR``. Replay is idempotent: metric points already on the
server (same key and step) are skipped, run creation finds a run it made before by its ``uid`` tag,
tags / params / artifacts / status are overwrites. HTTP calls get a short timeout and no retries
inside MLflow (``tracking.mlflow_timeout_s``), so a dead server costs seconds; after a failure the
link waits ``tracking.mlflow_retry_s`` (doubling, at most 10x) before trying again.

Credentials in the tracking URI (``user:password@``, token-like query parameters) never reach a log
line, a param, a file this backend writes or an uploaded text artifact: see :class:`Redactor`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from megatron_elastic.tracking.base import Tracker, flatten
from megatron_elastic.tracking.spool import Spool
from megatron_elastic.utils.redact import SECRET_WORDS, redact
from megatron_elastic.version import __version__

RUN_FILE = "mlflow_run.json"
STAGING_DIR = "mlflow_staging"
_PARAM_LIMIT_FALLBACK = 500  # MLflow servers before 1.28 accept 500 characters per param value
_BATCH_PARAMS = 100  # MLflow's limit of params + tags per log_batch
_BATCH_METRICS = 1000  # ... and of metrics
class Redactor:
    """:func:`redact` plus the literal secrets of one tracking URI (its password and token values,
    as written and URL-decoded), which also hides them where an error message quotes them alone."""

    def __init__(self, uri: str):
        secrets: set[str] = set()
        try:
            parts = urlsplit(uri)
            if parts.password:
                secrets |= {parts.password, unquote(parts.password)}
            for key, value in parse_qsl(parts.query, keep_blank_values=False):
                if re.search(SECRET_WORDS, key, re.IGNORECASE):
                    secrets |= {value, unquote(value)}
        except ValueError:
            pass
        self.secrets = sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = redact(text)
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def touches(self, text: str) -> bool:
        return self(text) != text


def git_commit(path: Path) -> str | None:
    """The commit of the git checkout holding ``path`` (None outside a checkout or without git)."""
    try:
        r = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                           check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    commit = r.stdout.strip()
    return commit if r.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def config_hash(config: dict) -> str:
    """Short stable digest of a resolved config (credentials redacted first)."""
    text = redact(json.dumps(config, sort_keys=True, default=str))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_tags(config: dict, *, uid: str) -> dict[str, str]:
    tags = {"megatron_elastic.uid": uid, "megatron_elastic.version": __version__,
            "config_hash": config_hash(config)}  # fmt: skip
    # the package directory (tracking/..): the commit of the code that ran
    commit = git_commit(Path(__file__).parent.parent)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # what the MLflow UI shows as the source version
    tags.update(slurm_tags())
    return tags


def slurm_tags() -> dict[str, str]:
    env = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
           "SLURM_ARRAY_TASK_ID": "slurm_array_task_id", "SLURM_RESTART_COUNT": "slurm_restart_count"}  # fmt: skip
    return {tag: os.environ[var] for var, tag in env.items() if os.environ.get(var)}


def param_value_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except (ImportError, AttributeError):
        return _PARAM_LIMIT_FALLBACK


def config_params(config: dict, redactor: Redactor, *, limit: int) -> dict[str, str]:
    """The flattened config as MLflow params: keys at most 250 characters, values at most ``limit``
    (a longer value is cut and ends in '...'), credentials redacted."""
    out = {}
    for key, value in flatten(config).items():
        text = redactor(value if isinstance(value, str) else json.dumps(value, default=str))
        if len(text) > limit:
            text = text[: limit - 3] + "..."
        out[key[:250]] = text
    return out


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _is_rejection(exc: BaseException) -> bool:
    """True when the server answered and refused the request (4xx): sending it again cannot help."""
    try:
        from mlflow.exceptions import RestException
    except ImportError:  # pragma: no cover - mlflow is installed whenever this backend runs
        return False
    return isinstance(exc, RestException) and 400 <= exc.get_http_status_code() < 500


class _RedactingStream:
    """Forwards writes to ``stream`` with credentials hidden (MLflow prints run URLs built from the
    tracking URI, and its error messages quote the request URL)."""

    def __init__(self, stream, redactor: Redactor):
        self.stream, self.redactor = stream, redactor

    def write(self, text: str) -> int:
        self.stream.write(self.redactor(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _guarded(timeout_s: int, redactor: Redactor):
    """Around every MLflow call: a short HTTP timeout and no retries inside MLflow (it reads these
    variables per request; a value the user exported wins), no run-URL printing, and stdout/stderr
    (where MLflow and urllib3 log) passed through ``redactor``. Restored afterwards, so other MLflow
    users in the process keep their settings."""
    wanted = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout_s))), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # fmt: skip
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        with contextlib.redirect_stdout(_RedactingStream(sys.stdout, redactor)), \
                contextlib.redirect_stderr(_RedactingStream(sys.stderr, redactor)):  # fmt: skip
            yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class RunLink:
    """Delivers one run's records to MLflow, spooling what cannot be delivered (module docstring).

    Used by the tracker during training and by ``megatron-elastic tracking sync`` afterwards."""

    def __init__(self, run_dir: Path, uri: str, *, timeout_s: int = 10, retry_s: float = 30.0, say=None):
        self.run_dir = Path(run_dir).resolve()
        self.uri = uri
        self.redact = Redactor(uri)
        self.timeout_s = timeout_s
        self.retry_s = max(0.0, float(retry_s))
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.spool = Spool(self.run_dir)
        self.client = None
        self.run_id: str | None = None
        info = self.run_file()
        if info:
            self.run_id = info.get("run_id")
        self.retry_at = 0.0  # monotonic time of the next attempt after a failure
        self._backoff = self.retry_s
        self.outage_since: float | None = None
        self.dedupe_live = False  # set for a resumed run: the killed attempt may have logged later steps
        self._floor: dict[str, int] = {}  # key -> highest step on the server (resumed runs)
        self.delivered = {"records": 0, "points": 0, "skipped": 0, "artifacts": 0, "rejected": 0}

    # ------------------------------------------------------------------ state
    def say(self, text: str) -> None:
        self._say(self.redact(text))

    def run_file(self) -> dict | None:
        path = self.run_dir / RUN_FILE
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_run_file(self, run_id: str, uid: str) -> None:
        path = self.run_dir / RUN_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": run_id, "uid": uid, "tracking_uri": self.redact(self.uri)}) + "\n")
        os.replace(tmp, path)

    def pending_create(self) -> dict | None:
        """The run-creation record still in the spool (the server was down when the run began)."""
        return next((r for r in self.spool.read() if r.get("kind") == "create"), None)

    def _client(self):
        if self.client is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from mlflow.tracking import MlflowClient
            self.client = MlflowClient(tracking_uri=self.uri)
        return self.client

    # ------------------------------------------------------------------ delivery
    def submit(self, record: dict) -> bool:
        """Send ``record`` now if possible, else spool it. True when it reached the server."""
        if time.monotonic() < self.retry_at:
            self.spool.append(record)
            return False
        if not self.spool.is_empty() and not self.replay():
            self.spool.append(record)
            return False
        try:
            with _guarded(self.timeout_s, self.redact):
                self._send(record, self._live_filter)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            if _is_rejection(exc):
                self._rejected(record, exc)
                return False
            self.spool.append(record)
            self._failed(exc)
            return False
        self.delivered["records"] += 1
        return True

    def replay(self, *, force: bool = False) -> bool:
        """Deliver the spooled records in order. True when the spool is empty afterwards.

        ``force`` ignores the back-off (the end of a run, ``tracking sync``)."""
        if not force and time.monotonic() < self.retry_at:
            return False
        with self.spool.replay_lock() as mine:
            if not mine:  # another process (e.g. `tracking sync`) is replaying right now
                return False
            records = self.spool.read()
            if not records:
                return True
            seen: dict[str, set[int]] = {}
            done = 0
            try:
                with _guarded(self.timeout_s, self.redact):
                    for rec in records:
                        try:
                            self._send(rec, lambda key, step: self._replay_filter(seen, key, step))
                            self.delivered["records"] += 1
                        except Exception as exc:
                            if not _is_rejection(exc):
                                raise
                            self._rejected(rec, exc)
                        done += 1
            except Exception as exc:  # noqa: BLE001 - the spool keeps the rest for later
                self.spool.drop_first(done)
                self._failed(exc)
                return False
            self.spool.drop_first(done)
        if self.outage_since is not None:
            self.say(f"[mlflow] server reachable again after {time.monotonic() - self.outage_since:.0f}s; "
                     f"replayed {done} spooled records")  # fmt: skip
        self.outage_since = None
        self.retry_at, self._backoff = 0.0, self.retry_s
        return self.spool.is_empty()

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
            self.say(f"[mlflow] tracking server {self.uri} unreachable ({_first_line(exc)}); training continues, "
                     f"records are kept in {self.spool.path} and replayed when it answers again "
                     f"(next try in {self._backoff:.0f}s)")  # fmt: skip
        self.retry_at = now + self._backoff
        self._backoff = min(2 * self._backoff, 10 * self.retry_s) if self.retry_s else 0.0

    def _rejected(self, record: dict, exc: BaseException) -> None:
        self.delivered["rejected"] += 1
        n = self.delivered["rejected"]
        if n <= 3:  # the same cause (e.g. a run deleted on the server) would repeat every step
            more = "; further refusals are only counted" if n == 3 else ""
            self.say(f"[mlflow] the server refused a {record.get('kind')} record ({_first_line(exc)}); dropped{more}")

    # ------------------------------------------------------------------ metric de-duplication
    def _history_steps(self, key: str) -> set[int]:
        return {m.step for m in self._client().get_metric_history(self.run_id, key)}

    def _replay_filter(self, seen: dict[str, set[int]], key: str, step: int) -> bool:
        """Replay: a (key, step) already on the server, or sent earlier in this replay, is skipped."""
        if key not in seen:
            seen[key] = self._history_steps(key)
        if step in seen[key]:
            return False
        seen[key].add(step)
        return True

    def _live_filter(self, key: str, step: int) -> bool:
        """Live: only a resumed run can repeat steps (those after its last checkpoint); metrics of a
        run arrive in step order, so the highest step already on the server is enough."""
        if not self.dedupe_live:
            return True
        if key not in self._floor:
            self._floor[key] = max(self._history_steps(key), default=-1)
        return step > self._floor[key]

    # ------------------------------------------------------------------ one record
    def _send(self, rec: dict, keep) -> None:
        kind = rec["kind"]
        if kind == "create":
            self._create(rec)
            return
        if self.run_id is None:
            raise RuntimeError("no MLflow run yet (its creation record is missing from the spool)")
        client = self._client()
        if kind == "metrics":
            from mlflow.entities import Metric

            step, ts = int(rec["step"]), int(rec["ts"])
            batch = [Metric(k, float(v), ts, step) for k, v in rec["values"].items() if keep(k, step)]
            self.delivered["skipped"] += len(rec["values"]) - len(batch)
            for i in range(0, len(batch), _BATCH_METRICS):
                client.log_batch(self.run_id, metrics=batch[i : i + _BATCH_METRICS])
            self.delivered["points"] += len(batch)
        elif kind == "tags":
            from mlflow.entities import RunTag

            tags = [RunTag(k, str(v)) for k, v in rec["tags"].items()]
            for i in range(0, len(tags), _BATCH_PARAMS):
                client.log_batch(self.run_id, tags=tags[i : i + _BATCH_PARAMS])
        elif kind == "artifact":
            path = Path(rec["path"])
            if not path.exists():
                self.say(f"[mlflow] artifact {path} no longer exists; skipped")
                return
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), rec.get("artifact_path"))
            else:
                client.log_artifact(self.run_id, str(path), rec.get("artifact_path"))
            self.delivered["artifacts"] += 1
        elif kind == "status":
            if rec["status"] == "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            else:
                client.set_terminated(self.run_id, status=rec["status"], end_time=rec.get("ts"))
        else:
            raise ValueError(f"unknown spool record kind {kind!r}")

    def _create(self, rec: dict) -> None:
        """Create the run (or find the one an earlier, unanswered attempt created) and log its
        params and tags; writes RUN_DIR/mlflow_run.json."""
        from mlflow.entities import Param, RunTag

        client = self._client()
        info = self.run_file()
        if info and info.get("uid") == rec["uid"]:
            self.run_id = info["run_id"]
            return
        exp = client.get_experiment_by_name(rec["experiment"])
        if exp is None:
            exp_id = client.create_experiment(rec["experiment"], artifact_location=rec.get("artifact_location"))
        else:
            exp_id = exp.experiment_id
        uid_filter = f"tags.`megatron_elastic.uid` = '{rec['uid']}'"
        found = client.search_runs([exp_id], filter_string=uid_filter, max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {k: str(v) for k, v in rec["tags"].items()}
            run = client.create_run(exp_id, start_time=rec.get("ts"), tags=tags, run_name=rec["run_name"])
            run_id = run.info.run_id
        params = [Param(k, v) for k, v in rec["params"].items()]
        for i in range(0, len(params), _BATCH_PARAMS):
            chunk = params[i : i + _BATCH_PARAMS]
            try:
                client.log_batch(run_id, params=chunk)
            except Exception as exc:
                if not _is_rejection(exc):
                    raise
                # An older server's limit is 500 characters: resend the long values cut to it.
                cut = [Param(p.key, p.value if len(p.value) <= _PARAM_LIMIT_FALLBACK else p.value[:497] + "...")
                       for p in chunk]  # fmt: skip
                client.log_batch(run_id, params=cut)
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in rec["tags"].items()][:_BATCH_PARAMS])
        self.run_id = run_id
        self._write_run_file(run_id, rec["uid"])


class MLflowTracker(Tracker):
    def __init__(self, tracking_cfg, *, stream=None):
        self.cfg = tracking_cfg
        self.stream = stream
        self.link: RunLink | None = None
        self.redact = Redactor(tracking_cfg.mlflow_uri)

    def _say(self, text: str) -> None:
        print(self.redact(text), file=self.stream or sys.stderr, flush=True)

    def start(self, *, run_dir, config, resumed, total_steps, start_step) -> None:
        try:
            self._start(Path(run_dir).resolve(), config, resumed, start_step)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._say(f"[mlflow] could not start tracking ({_first_line(exc)}); training continues without MLflow")
            self.link = None

    def _start(self, run_dir: Path, config: dict, resumed: bool, start_step: int) -> None:
        try:
            import mlflow  # noqa: F401 - fail here, once, rather than on every record
        except ImportError:
            self._say("[mlflow] mlflow is not installed (pip install 'megatron-elastic[mlflow]'); "
                      "training continues without MLflow")  # fmt: skip
            return
        uri = self.cfg.mlflow_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        link = RunLink(run_dir, uri, timeout_s=getattr(self.cfg, "mlflow_timeout_s", 10),
                       retry_s=getattr(self.cfg, "mlflow_retry_s", 30.0), say=self._say)  # fmt: skip
        self.link = link
        now = int(time.time() * 1000)
        existing = link.run_file()
        pending = None if existing else link.pending_create()
        if existing or pending:
            # One run directory, one MLflow run: a resume, a requeue, a restart after the server was
            # down. Params stay those of the first attempt (MLflow cannot change them); the tags
            # follow the latest attempt.
            link.dedupe_live = True
            tags = {**slurm_tags(), "resumed_at_step": str(start_step), "config_hash": config_hash(config)}
            link.submit({"kind": "tags", "tags": tags})
            link.submit({"kind": "status", "status": "RUNNING", "ts": now})
            where = f"run {link.run_id}" if link.run_id else "the run waiting in the spool"
        else:
            uid = uuid.uuid4().hex
            location = None if self.cfg.mlflow_uri else (run_dir / "mlartifacts").as_uri()
            params = config_params(config, self.redact, limit=param_value_limit())
            link.submit({"kind": "create", "uid": uid, "experiment": self.cfg.experiment,
                         "run_name": self.cfg.run_name or run_dir.name, "artifact_location": location,
                         "tags": run_tags(config, uid=uid) | {"run_dir": str(run_dir)}, "params": params,
                         "ts": now})  # fmt: skip
            where = f"run {link.run_id}" if link.run_id else "a run (created once the server answers)"
            self._log_importance(config)
        print(self.redact(f"[mlflow] tracking to {where} at {uri}"), flush=True)

    def _log_importance(self, config: dict) -> None:
        """The importance report of the parent (``megatron-elastic importance`` writes ranking.json
        and importance.md side by side)."""
        ranking = ((config.get("elastic") or {}).get("ranking")) or ""
        if not ranking or not Path(ranking).is_file():
            return
        for path in (Path(ranking), Path(ranking).with_name("importance.md")):
            if path.is_file():
                self.log_artifact(path, artifact_path="importance")

    def log_metrics(self, metrics, step) -> None:
        if self.link is None:
            return
        try:
            values = {k: float(v) for k, v in metrics.items()}
            self.link.submit({"kind": "metrics", "step": int(step), "ts": int(time.time() * 1000), "values": values})
        except Exception as exc:  # noqa: BLE001
            self._say(f"[mlflow] metrics of step {step} not recorded ({_first_line(exc)})")

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        if self.link is None:
            return
        try:
            path = self._staged(Path(path).resolve(), artifact_path)
            self.link.submit({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})
        except Exception as exc:  # noqa: BLE001
            self._say(f"[mlflow] artifact {path} not recorded ({_first_line(exc)})")

    def _staged(self, path: Path, artifact_path: str | None) -> Path:
        """A redacted copy of a text file that quotes the tracking credentials (e.g. the resolved
        config holds the URI), kept under RUN_DIR/mlflow_staging until it has been uploaded."""
        if not self.redact.secrets or not path.is_file() or path.stat().st_size > 16 << 20:
            return path
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            return path
        if not self.redact.touches(text):
            return path
        dst = self.link.run_dir / STAGING_DIR / (artifact_path or "") / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(self.redact(text))
        return dst

    def finish(self, status="FINISHED") -> None:
        if self.link is None:
            return
        link = self.link
        try:
            link.submit({"kind": "status", "status": status, "ts": int(time.time() * 1000)})
            if not link.spool.is_empty():
                link.replay(force=True)  # the end of the run: one more try, whatever the back-off says
            left = len(link.spool)
            if left:
                self._say(f"[mlflow] {left} records could not be delivered; they are kept in {link.spool.path}. "
                          f"When the server is back run: megatron-elastic tracking sync {link.run_dir}")  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            self._say(f"[mlflow] finishing the run failed ({_first_line(exc)})")
