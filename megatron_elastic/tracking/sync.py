"""``megatron-elastic tracking sync RUN_DIR``: deliver the records a run spooled while its MLflow
server was unreachable (``RUN_DIR/mlflow_spool.jsonl``), in order, each metric point once.

Safe to run at any time, also while the run is still training (the two take turns through a lock)
and more than once (points already on the server are skipped)."""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_elastic.errors import UserError


def _run_tracking_section(run_dir: Path) -> dict:
    from megatron_elastic.config.loader import read_yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    raw = read_yaml(path, "run config") or {}
    section = (raw.get("tracking") or {}) if isinstance(raw, dict) else None
    timeout = section.get("mlflow_timeout_s", 10) if isinstance(section, dict) else None
    uri = section.get("mlflow_uri") or "" if isinstance(section, dict) else None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1 or not isinstance(uri, str):
        raise UserError(f"{str(path)!r} has no valid tracking section; it is not a run's config.yaml (restore it "
                        "from a checkpoint's config.yaml)")  # fmt: skip
    return section


def sync(run_dir: Path, uri: str = "", *, timeout_s: int | None = None, say=None) -> dict:
    """Replay the spool of ``run_dir``; returns the delivery counts. Raises UserError when there is
    nothing to sync to or the server does not answer."""
    from megatron_elastic.tracking.mlflow_backend import RunLink
    from megatron_elastic.utils.redact import is_redacted, redact
    from megatron_elastic.tracking.spool import Spool

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist; give the run_dir of a training run")
    section = _run_tracking_section(run_dir)
    if not uri and is_redacted(section.get("mlflow_uri") or ""):
        raise UserError(f"the run's config.yaml holds the tracking URI without its credentials "
                        f"({section['mlflow_uri']}); pass it in full with --tracking-uri")  # fmt: skip
    uri = uri or section.get("mlflow_uri") or f"sqlite:///{run_dir / 'mlflow.db'}"
    spool = Spool(run_dir)
    link = RunLink(run_dir, uri, timeout_s=timeout_s or int(section.get("mlflow_timeout_s") or 10), retry_s=0, say=say)
    if spool.is_empty():
        if link.run_file() is None:
            raise UserError(f"{str(run_dir)!r} holds no MLflow records (no mlflow_run.json, no {spool.path.name}); "
                            "was it trained with tracking.backends=[console,mlflow]?")  # fmt: skip
        return {"pending": 0, **link.delivered, "run_id": link.run_id}
    pending = len(spool)
    if not link.replay(force=True):
        left = len(spool)
        raise UserError(f"tracking server {redact(uri)} did not take the records ({left} of {pending} still in "
                        f"{spool.path}); start it (or pass --tracking-uri) and run the sync again")  # fmt: skip
    return {"pending": pending, **link.delivered, "run_id": link.run_id}


def cmd_sync(args) -> int:
    from megatron_elastic.tracking.mlflow_backend import Redactor

    if args.timeout is not None and args.timeout < 1:
        raise UserError(f"--timeout {args.timeout} is invalid; give the seconds one request may take (>= 1)")
    hide = Redactor(args.tracking_uri or "")
    out = sync(Path(args.run_dir), args.tracking_uri, timeout_s=args.timeout,
               say=lambda text: print(hide(text), file=sys.stderr, flush=True))  # fmt: skip
    if out["pending"] == 0:
        print(f"[tracking] nothing to sync: every record of MLflow run {out['run_id']} was delivered")
    else:
        print(f"[tracking] synced {out['records']} of {out['pending']} spooled records to MLflow run {out['run_id']}: "
              f"{out['points']} metric points sent, {out['skipped']} already there, {out['artifacts']} artifacts, "
              f"{out['rejected']} refused by the server")  # fmt: skip
    return 0


def register(subparsers) -> None:
    """Add ``tracking sync`` to the ``megatron-elastic`` command line."""
    tracking = subparsers.add_parser("tracking", help="experiment tracking utilities (MLflow)")
    sub = tracking.add_subparsers(dest="tracking_command", metavar="ACTION")
    p = sub.add_parser("sync", help="send the records a run spooled while its MLflow server was unreachable",
                       description="Send the records a run kept in RUN_DIR/mlflow_spool.jsonl while its MLflow "
                                   "server was unreachable, in order, each metric point once. Safe to repeat, and "
                                   "to run while the run is still training.")  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (holds mlflow_spool.jsonl)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: the run's tracking.mlflow_uri)")
    p.add_argument("--timeout", type=int, default=None, help="seconds per HTTP request (default: the run's setting)")
    p.set_defaults(func=cmd_sync)
    tracking.set_defaults(func=lambda a: tracking.print_help() or 2)
