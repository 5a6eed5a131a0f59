"""Training end to end through the real command line: learning, exact resume after SIGKILL,
graceful stop on SIGTERM/SIGUSR1, user errors, MLflow's local store."""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import assert_user_error, run

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
# Small and fast: ~0.1 s per step on 2 cores.
FAST = ["data.seq_len=64", "data.builtin_max_mb=0.5", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.warmup_steps=3", "train.log_interval=1", "train.eval_batches=2"]  # fmt: skip


def train_cmd(cli_exe, run_dir, cache, *extra):
    return [*cli_exe, "train", "--config", str(CONFIG), f"run_dir={run_dir}", f"data.cache_dir={cache}", *FAST, *extra]


def trace(run_dir):
    """Every metric record, by kind, in step order."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return train, valid


def wait_for_step(run_dir, step, proc, timeout=300):
    path = Path(run_dir) / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()}")
        if path.exists():
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference_run(cli_exe, cache, tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints every 3 steps)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    r = run(train_cmd(cli_exe, run_dir, cache, "train.max_steps=12", "train.save_interval=3", "train.eval_interval=4"))
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir, r


def test_training_learns(reference_run):
    run_dir, r = reference_run
    train, valid = trace(run_dir)
    assert [s for s, *_ in train] == list(range(1, 13))
    assert [s for s, _ in valid] == [4, 8, 12]
    assert train[-1][1] < train[0][1] - 0.5  # the loss goes down
    assert "final validation loss" in r.stdout and "unigram baseline" in r.stdout
    # warmup then cosine: 3 warmup steps reach the peak lr
    assert train[2][2] == pytest.approx(3e-3) and train[-1][2] < train[3][2]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000009", "step_00000012"]  # keep_last=2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    for name in ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "config.yaml"):
        assert (run_dir / "checkpoints" / "step_00000012" / name).is_file()
    # a checkpoint is a native model directory: load_pretrained reads it
    import megatron_elastic

    model = megatron_elastic.load_pretrained(run_dir / "checkpoints" / "step_00000012")
    assert model.config.pattern == "M-M*-M-"


def test_sigkill_at_random_step_resumes_exactly(cli_exe, cache, reference_run, tmp_path):
    ref_dir, _ = reference_run
    run_dir = tmp_path / "run"
    cmd = train_cmd(cli_exe, run_dir, cache, "train.max_steps=12", "train.save_interval=3", "train.eval_interval=4")
    kill_at = random.Random(os.getpid()).randint(4, 10)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    r = run(cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming at step" in r.stdout
    # value for value, including lr and gradient norms
    assert trace(run_dir) == trace(ref_dir), f"killed at step {kill_at}"


def test_killed_before_its_first_checkpoint_restarts_without_duplicate_records(cli_exe, cache, reference_run,
                                                                              tmp_path):  # fmt: skip
    ref_dir, _ = reference_run
    run_dir = tmp_path / "run"
    # checkpoints do not change the numbers: the first one here is at step 6, well after the kill
    cmd = train_cmd(cli_exe, run_dir, cache, "train.max_steps=12", "train.save_interval=6", "train.eval_interval=4")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 2, proc)  # steps 1-2 are in metrics.jsonl
    proc.send_signal(signal.SIGSTOP)
    assert not (run_dir / "checkpoints" / "latest").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    r = run(cmd)
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stdout + r.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((ref_dir / "metrics.jsonl").read_text().splitlines())
    assert trace(run_dir) == trace(ref_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_and_exits_for_requeue(cli_exe, cache, reference_run, tmp_path, sig):
    ref_dir, _ = reference_run
    run_dir = tmp_path / "run"
    cmd = train_cmd(cli_exe, run_dir, cache, "train.max_steps=12", "train.save_interval=3", "train.eval_interval=4")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 5, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 5 <= stopped_at < 12 and f"signal {int(sig)}: checkpointed step {stopped_at}" in out
    r = run(cmd)
    assert r.returncode == 0, r.stderr
    assert trace(run_dir) == trace(ref_dir)


def test_stop_signal_during_start_up_exits_for_requeue_with_nothing_written(cli_exe, tmp_path):
    """A stop while the corpus is being tokenized (the process is paused at that line so the signal
    lands there) exits 75, not 143 / 138, and leaves no checkpoint, metrics or partial cache: the
    requeued attempt starts from scratch (it is stopped the same way, by the other signal)."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        proc = subprocess.Popen(train_cmd(cli_exe, run_dir, cache, "train.max_steps=3"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})  # fmt: skip
        for line in proc.stderr:  # progress of the data preparation goes to stderr
            if line.startswith("[data] tokenizing"):
                break
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 75, out + err
        assert f"signal {int(sig)} during start-up, before the first step" in out and "Traceback" not in err
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
        assert not list(tmp_path.rglob(".*.tmp-*")), "a temporary directory was left behind"
        assert not list(cache.glob("builtin-v*")), "a partial dataset was left in the cache"


def test_gradient_accumulation_matches_larger_micro_batch(cli_exe, cache, tmp_path):
    a = run(train_cmd(cli_exe, tmp_path / "a", cache, "train.max_steps=3", "train.micro_batch_size=8"))
    b = run(train_cmd(cli_exe, tmp_path / "b", cache, "train.max_steps=3", "train.micro_batch_size=2"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ta, tb = trace(tmp_path / "a")[0], trace(tmp_path / "b")[0]
    for (sa, la, _, ga), (sb, lb, _, gb) in zip(ta, tb):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5) and ga == pytest.approx(gb, rel=1e-4)


# ---------------------------------------------------------------------- user errors

def test_missing_data_files(cli_exe, cache, tmp_path):
    r = run(train_cmd(cli_exe, tmp_path / "run", cache, f"data.train_prefix={tmp_path}/nothing",
                      "data.tokenizer=builtin"))  # fmt: skip
    assert_user_error(r, "nothing.bin")
    assert not (tmp_path / "run").exists()


def test_bad_override_and_unknown_key(cli_exe, cache, tmp_path):
    assert_user_error(run(train_cmd(cli_exe, tmp_path / "run", cache, "train.lr")), "bad override 'train.lr'")
    assert_user_error(run(train_cmd(cli_exe, tmp_path / "run", cache, "train.learning_rate=1")),
                      "unknown config key 'train.learning_rate'")  # fmt: skip
    assert_user_error(run(train_cmd(cli_exe, tmp_path / "run", cache, "data.seq_lenn=3")),
                      "did you mean 'data.seq_len'?")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(cli_exe, cache, reference_run, tmp_path):
    """The finished reference run with its newest checkpoint cut short after it was published: a rerun
    resumes from the previous one (one warning line naming the skipped one) and ends on the same trace."""
    import shutil

    ref_dir, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    weights = run_dir / "checkpoints" / "step_00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a full disk, or a copy cut short
    r = run(train_cmd(cli_exe, run_dir, cache, "train.max_steps=12", "train.save_interval=3", "train.eval_interval=4"))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("[checkpoint] skipped")]
    assert len(warnings) == 1 and "step_00000012" in warnings[0] and "step_00000009" in warnings[0], r.stderr
    assert "resuming at step 9" in r.stdout
    assert trace(run_dir) == trace(ref_dir)


def test_keep_last_is_honoured_at_start_up(cache, reference_run, tmp_path):
    """A run killed after moving ``latest`` but before pruning leaves keep_last + 1 checkpoints: the next
    start prunes them (and stale temporary files) before training on; the trace stays the reference's."""
    import shutil

    from megatron_elastic.cli import main

    ref_dir, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step_00000009", ckpts / "step_00000006")  # the one the killed save would have pruned
    (ckpts / ".latest.tmp-1").write_text("step_00000012\n")
    argv = train_cmd([], run_dir, cache, "train.max_steps=12", "train.save_interval=3", "train.eval_interval=4")
    assert main(argv) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000009", "step_00000012"]
    assert trace(run_dir) == trace(ref_dir)


def test_resume_errors(cli_exe, cache, tmp_path):
    run_dir = tmp_path / "run"
    r = run(train_cmd(cli_exe, run_dir, cache, "train.max_steps=2"))
    assert r.returncode == 0, r.stderr
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    # a different model shape
    r = run(train_cmd(cli_exe, run_dir, cache, "train.max_steps=4", "model.ffn_hidden_size=256"))
    assert_user_error(r, "into a different model shape (ffn_hidden_size: checkpoint 384 vs config 256)")
    # a truncated checkpoint
    weights = run_dir / "checkpoints" / "step_00000002" / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:1000])
    r = run(train_cmd(cli_exe, run_dir, cache, "train.max_steps=4"))
    assert_user_error(r, "is damaged (model.safetensors has 1,000 bytes, the manifest ")
    assert "no usable checkpoint in" in r.stderr
    # a missing file
    weights.write_bytes(intact)
    (run_dir / "checkpoints" / "step_00000002" / "optimizer.pt").unlink()
    r = run(train_cmd(cli_exe, run_dir, cache, "train.max_steps=4"))
    assert_user_error(r, "is damaged (optimizer.pt is missing)")
    after = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert [p for p in after if p not in before] == []


def test_mlflow_local_store(cli_exe, cache, tmp_path):
    run_dir = tmp_path / "run"
    r = run(train_cmd(cli_exe, run_dir, cache, "train.max_steps=4", "train.eval_interval=2",
                      "tracking.backends=[console,mlflow]"))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["train.lr"] == "0.003" and mrun.data.params["model.pattern"] == "M-M*-M-"
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    ours = {s: l for s, l, *_ in trace(run_dir)[0]}
    assert all(m.value == pytest.approx(ours[m.step]) for m in losses)
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [2, 4]
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(mrun.data.metrics)
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
