"""MLflow tracking against a real server the tests start on loopback (sqlite store, temporary
artifact root): what a tiny elastic run logs, resume into the same run, a server killed and restarted
mid-run (spool, automatic replay, ``tracking sync``, every metric point exactly once), a server down
or hanging from the start, credentials kept out of every log line."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from spawning import free_port
from test_elastic import FAST, records

from megatron_elastic.config import load_config
from megatron_elastic.tracking import flatten
from megatron_elastic.tracking.mlflow_backend import MLflowTracker

REPO = Path(__file__).resolve().parents[2]
SECRET = "pw-Zq81xv"
# One micro-batch per step and one validation batch: a step takes about a second on two cores.
TINY = [*FAST, "train.global_batch_size=4", "train.eval_batches=1", "tracking.peak_tflops=0.05"]


class Server:
    """``mlflow server`` on a loopback port; stop() kills its process group, start() brings it back
    on the same port, store and artifact root."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts in seconds
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]  # fmt: skip
        with open(self.root / "server.log", "a") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise AssertionError(f"mlflow server did not answer /health within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def live_server(server):
    """The session server, running again after a test that stopped it."""
    yield server
    if server.proc is None:
        server.start()


def train_cmd(parent, run_dir, cache, uri, *extra):
    exe = Path(sys.executable).parent / "megatron-elastic"
    return [str(exe), "train", "--config", "elastic-tiny", "--tracking-uri", uri, f"elastic.parent={parent}",
            f"run_dir={run_dir}", f"data.cache_dir={cache}", *TINY, *extra]  # fmt: skip


def secret_uri(server) -> str:
    return f"http://alice:{SECRET}@127.0.0.1:{server.port}"


def wait_for_step(proc, run_dir: Path, step: int, timeout: float = 300) -> None:
    path = run_dir / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"training ended before step {step}: " + proc.stderr.read()
        if path.exists() and any(json.loads(x).get("step", 0) >= step for x in path.read_text().splitlines()
                                 if x.strip().endswith("}")):  # fmt: skip
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def run_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def assert_each_point_once(client, run_id: str, run_dir: Path) -> dict[str, list[int]]:
    """Every (key, step) of RUN_DIR/metrics.jsonl is on the server exactly once with its value; the
    server holds no other step of those keys. Returns the server's steps per key."""
    expected: dict[str, dict[int, float]] = {}
    for rec in records(run_dir):
        for k, v in rec.items():
            if k != "step":
                expected.setdefault(k, {})[rec["step"]] = v
    on_server = {}
    for key, points in expected.items():
        history = client.get_metric_history(run_id, key)
        steps = sorted(m.step for m in history)
        assert steps == sorted(points), (key, steps, sorted(points))
        for m in history:
            assert m.value == pytest.approx(points[m.step], rel=1e-6, abs=1e-9), (key, m.step)
        on_server[key] = steps
    return on_server


def artifact_paths(client, run_id: str, path=None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, a.path) if a.is_dir else [a.path]
    return sorted(out)


EXPECTED_ARTIFACTS = sorted([
    "config.yaml", "importance/ranking.json", "many-in-one/elastic.json",
    "architectures/budget-1.json", "architectures/budget-0.75.json", "architectures/budget-0.5.json",
    "reports/extraction_report.json", "reports/extraction_report.md", "plots/pareto.png", "plots/loss_curves.png",
])  # fmt: skip


def test_tiny_elastic_run_logs_everything_and_resumes_into_the_same_run(live_server, tiny_parent_dir, cache,
                                                                        tmp_path):  # fmt: skip
    """Killed (SIGKILL) after its first checkpoint and started again: one MLflow run, each metric
    point once, params / tags / artifacts complete, the password nowhere."""
    server = live_server
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_parent_dir, run_dir, cache, secret_uri(server), "train.max_steps=6", "train.eval_interval=3",
                    "train.save_interval=3")  # fmt: skip
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_step(proc, run_dir, 4)  # after the step-3 checkpoint: steps 4.. are logged twice
    proc.send_signal(signal.SIGKILL)
    out1, err1 = proc.communicate(timeout=60)
    first_id = run_id_of(run_dir)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming at step 3" in r.stdout
    logs = out1 + err1 + r.stdout + r.stderr
    assert SECRET not in logs and "alice:***" not in logs and "***@127.0.0.1" in logs

    client = server.client()
    run_id = run_id_of(run_dir)
    assert run_id == first_id
    runs = client.search_runs([client.get_run(run_id).info.experiment_id],
                              filter_string=f"tags.run_dir = '{run_dir.resolve()}'")  # fmt: skip
    assert [x.info.run_id for x in runs] == [run_id]  # the resumed attempt made no second run
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "run"

    # tags: git commit of this checkout, config hash, Slurm job id
    tags = mrun.data.tags
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"] == head and tags["mlflow.source.git.commit"] == head
    assert len(tags["config_hash"]) == 16 and tags["slurm_job_id"] == "4242" and tags["resumed_at_step"] == "3"

    # params: the whole flattened resolved config, credentials redacted
    resolved = load_config(run_dir / "config.yaml").to_dict()
    params = mrun.data.params
    assert set(params) == set(flatten(resolved)) and len(params) > 100
    assert params["train.max_steps"] == "6" and params["elastic.budgets"] == "[1.0, 0.75, 0.5]"
    assert params["tracking.mlflow_uri"] == f"http://***@127.0.0.1:{server.port}"
    assert all(SECRET not in v for v in params.values())

    # metrics: each point of metrics.jsonl once (the redone steps 4.. included), per budget
    steps = assert_each_point_once(client, run_id, run_dir)
    assert steps["loss"] == [1, 2, 3, 4, 5, 6] and steps["val_loss/b0.50"] == [3, 6]
    for tag in ("b0.75", "b0.50"):
        assert steps[f"arch/{tag}/cost"] == [1, 2, 3, 4, 5, 6]
        for axis in ("hidden", "ffn", "mamba_heads", "depth"):
            keys = [k for k in steps if k.startswith(f"router/{tag}/{axis}/")]
            assert len(keys) >= 2
            for s in range(1, 7):  # probabilities of an axis's choices sum to one at every logged step
                total = sum(m.value for k in keys for m in client.get_metric_history(run_id, k) if m.step == s)
                assert total == pytest.approx(1.0, abs=1e-5)
    tracker_only = {"tokens_per_s", "tflops", "mfu", "memory/rss_gib"}  # throughput: tracker only
    for key in tracker_only:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4, 5, 6], key
    tau = [m.value for m in sorted(client.get_metric_history(run_id, "tau"), key=lambda m: m.step)]
    assert tau[0] == 1.0 and tau == sorted(tau, reverse=True)

    # artifacts: resolved config (redacted), importance report, architectures, reports, plots
    assert artifact_paths(client, run_id) == EXPECTED_ARTIFACTS
    dst = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    config_text = (dst / "config.yaml").read_text()
    assert SECRET not in config_text and f"mlflow_uri: http://***@127.0.0.1:{server.port}" in config_text
    for png in ("plots/pareto.png", "plots/loss_curves.png"):
        assert (dst / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (dst / png).stat().st_size > 10_000
    report = json.loads((dst / "reports/extraction_report.json").read_text())
    meta = json.loads((run_dir / "many-in-one" / "elastic.json").read_text())
    assert [r["key"] for r in report] == list(meta["architectures"])
    assert [r["achieved_cost_fraction"] for r in report] == list(meta["achieved_cost_fraction"].values())
    last_val = records(run_dir)[-1]
    assert [r["val_loss"] for r in report] == [last_val[f"val_loss/b{r['budget']:.2f}"] for r in report]
    assert report[0]["parameters"] > report[1]["parameters"] > report[2]["parameters"]
    for r in report:
        arch = json.loads((dst / f"architectures/budget-{r['key']}.json").read_text())
        assert arch["architecture"] == meta["architectures"][r["key"]] and arch["parameters"] == r["parameters"]
    # nothing of the tracking state holds the password either
    for path in [run_dir / "mlflow_run.json", run_dir / "config.yaml", *run_dir.glob("checkpoints/step_*/config.yaml")]:
        assert SECRET not in path.read_text(), path
    assert len(list(run_dir.glob("checkpoints/step_*/config.yaml"))) >= 1
    assert not (run_dir / "mlflow_spool.jsonl").exists()


def test_server_killed_mid_run_spools_replays_and_syncs(live_server, tiny_parent_dir, cache, tmp_path):
    """Server killed at step 2, back at step 4 (the run replays on its own), killed again before the
    end (the run finishes, records stay in the spool); restarted -> `tracking sync` -> every metric
    point exactly once. The trainer is paused (SIGSTOP) around each kill so the steps are exact."""
    server = live_server
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_parent_dir, run_dir, cache, secret_uri(server), "train.max_steps=8", "train.eval_interval=4",
                    "train.save_interval=0", "tracking.mlflow_retry_s=0.2", "tracking.mlflow_timeout_s=2")  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def paused(action):
        proc.send_signal(signal.SIGSTOP)
        try:
            action()
        finally:
            proc.send_signal(signal.SIGCONT)

    wait_for_step(proc, run_dir, 2)
    paused(server.stop)
    run_id = run_id_of(run_dir)  # created while the server was up
    wait_for_step(proc, run_dir, 4)
    paused(server.start)
    client = server.client()
    t1 = time.time()
    while time.time() - t1 < 120:  # the run replays its spool at its next record after the back-off
        if {1, 2, 3, 4} <= {m.step for m in client.get_metric_history(run_id, "loss")}:
            break
        assert proc.poll() is None, "the run ended before it replayed on its own"
        time.sleep(0.1)
    else:
        raise AssertionError("spooled records were not replayed while the run went on")
    paused(server.stop)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert "unreachable" in err and "reachable again" in err and "tracking sync" in err
    assert SECRET not in out + err
    spool = run_dir / "mlflow_spool.jsonl"
    kinds = [json.loads(x)["kind"] for x in spool.read_text().splitlines()]
    assert kinds[-1] == "status" and "metrics" in kinds and "artifact" in kinds

    server.start()
    loss_before = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert loss_before[:4] == [1, 2, 3, 4] and len(loss_before) == len(set(loss_before)) < 8
    assert client.get_run(run_id).info.status == "RUNNING"
    exe = Path(sys.executable).parent / "megatron-elastic"
    # the run directory keeps the URI without its password: sync asks for it instead of failing to log in
    r = subprocess.run([str(exe), "tracking", "sync", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert "pass it in full with --tracking-uri" in r.stderr and SECRET not in r.stderr
    sync = [str(exe), "tracking", "sync", str(run_dir), "--tracking-uri", secret_uri(server)]
    r = subprocess.run(sync, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"of {len(kinds)} spooled records to MLflow run {run_id}" in r.stdout
    assert SECRET not in r.stdout + r.stderr
    assert not spool.exists()
    steps = assert_each_point_once(client, run_id, run_dir)
    assert steps["loss"] == list(range(1, 9)) and steps["val_loss/b1.00"] == [4, 8]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert artifact_paths(client, run_id) == EXPECTED_ARTIFACTS
    # again: nothing left, nothing doubled
    r = subprocess.run(sync, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "nothing to sync" in r.stdout, r.stdout + r.stderr
    assert_each_point_once(client, run_id, run_dir)


def tracking_cfg(uri: str, **kw):
    cfg = load_config("tiny", [f"tracking.mlflow_uri={uri}", "tracking.backends=[console,mlflow]",
                               *(f"tracking.{k}={v}" for k, v in kw.items())])  # fmt: skip
    return cfg


def test_server_down_or_hanging_from_the_start(live_server, tmp_path, capsys):
    """A port nobody listens on, then a socket that accepts and never answers: each costs about one
    timeout, the run is created later by `tracking sync` (once, even after a second attempt)."""
    server = live_server
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)  # connections complete in the kernel; no reply ever comes
    dead_port = free_port()
    for attempt, port in enumerate((dead_port, hang.getsockname()[1])):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        uri = f"http://bob:{SECRET}@127.0.0.1:{port}"
        cfg = tracking_cfg(uri, mlflow_timeout_s=1, mlflow_retry_s=60)
        for start in range(2):  # a requeued job starting while the server is still down
            tracker = MLflowTracker(cfg.tracking)
            tracker.start(run_dir=run_dir, config=cfg.to_dict(), resumed=bool(start), total_steps=40,
                          start_step=20 * start)  # fmt: skip
            for step in range(20 * start + 1, 20 * start + 21):
                tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
            (run_dir / "note.txt").write_text(f"attempt {start}\n")
            tracker.log_artifact(run_dir / "note.txt", "notes")
            tracker.finish("KILLED" if start == 0 else "FINISHED")
        if port == hang.getsockname()[1]:  # every request is one connection left in the backlog: count them
            hang.setblocking(False)
            tried = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    hang.accept()[0].close()
                    tried += 1
            # about one timeout per attempt (start, final replay), not one per call (40+)
            assert 2 <= tried <= 8, tried
        assert not (run_dir / "mlflow_run.json").exists()
        kinds = [json.loads(x)["kind"] for x in (run_dir / "mlflow_spool.jsonl").read_text().splitlines()]
        assert kinds.count("create") == 1 and kinds.count("metrics") == 40 and kinds[-1] == "status"
        r = subprocess.run([str(Path(sys.executable).parent / "megatron-elastic"), "tracking", "sync", str(run_dir),
                            "--tracking-uri", f"http://bob:{SECRET}@127.0.0.1:{server.port}"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert SECRET not in r.stdout + r.stderr
        client = server.client()
        run_id = run_id_of(run_dir)
        mrun = client.get_run(run_id)
        assert mrun.info.status == "FINISHED" and mrun.data.params["train.lr"] == "0.003"
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 41))
        assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    hang.close()
    captured = capsys.readouterr()
    assert "unreachable" in captured.err and SECRET not in captured.out + captured.err
    assert "***@127.0.0.1" in captured.err


def test_sync_user_errors(live_server, tmp_path):
    exe = str(Path(sys.executable).parent / "megatron-elastic")
    r = subprocess.run([exe, "tracking", "sync", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds no MLflow records" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "mlflow_spool.jsonl").write_text(json.dumps({"kind": "status", "status": "FINISHED"}) + "\n")
    uri = f"http://carol:{SECRET}@127.0.0.1:{free_port()}"
    r = subprocess.run([exe, "tracking", "sync", str(tmp_path), "--tracking-uri", uri, "--timeout", "1"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "did not take the records (1 of 1 still in" in r.stderr, r.stderr
    assert SECRET not in r.stdout + r.stderr


def test_refused_records_are_dropped_not_spooled(live_server, tmp_path, capsys):
    """A record the server answers with 4xx (here: the run was deleted from the server) is dropped
    with a message, three at most, instead of being retried forever; training is not disturbed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": "f" * 32, "uid": "x"}))
    cfg = tracking_cfg(live_server.url)
    tracker = MLflowTracker(cfg.tracking)
    tracker.start(run_dir=run_dir, config=cfg.to_dict(), resumed=True, total_steps=10, start_step=5)
    for step in range(6, 11):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.finish()
    err = capsys.readouterr().err
    assert tracker.link.delivered["rejected"] == 2 + 5 + 1  # tags + status at start, 5 steps, final status
    assert err.count("refused") == 3 and "further refusals are only counted" in err
    assert not (run_dir / "mlflow_spool.jsonl").exists() and "unreachable" not in err
