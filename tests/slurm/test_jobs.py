"""Training jobs on the real local Slurm cluster (2 emulated nodes x 2 fake GPUs, gloo on CPU).

The uninterrupted 2-task run through the sbatch template is the reference; the same training
through ``megatron-elastic launch slurm``, preempted with ``scancel --signal=USR1``, must requeue,
resume and end with the same loss trace value for value; 2 nodes x 2 tasks (4 data-parallel ranks
on two emulated nodes whose names do not resolve) must reproduce it to float32 reduction order.
Errors: a job that fails at run time reaches the user; bad requests fail before submission.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLI = [str(Path(sys.executable).parent / "megatron-elastic")]
STEPS = 30
# Small and fast: ~0.1-0.3 s per step on 2 cores; enough steps that a signal sent after step 2
# lands well before the end. micro 2 x dp 2 x accumulation 2 = dp 4 x accumulation 1 = 8.
FAST = ["data.seq_len=32", "data.builtin_max_mb=0.5", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.warmup_steps=2", "train.log_interval=1", "train.eval_batches=2", "train.eval_interval=0",
        "train.save_interval=10", f"train.max_steps={STEPS}"]  # fmt: skip
LAUNCH = ["launch", "slurm", "--config", "tiny", "--profile", "ci", "--time", "10", "--poll", "2"]
TIMES: dict[str, float] = {}  # job round trips, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_round_trips():
    yield
    if TIMES:
        times = ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items())
        print(f"\n[slurm] job round trips (submit -> finished): {times}")


def trace(run_dir):
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs if "loss" in r]


def sacct(job_id, env):
    """(state, exit code) of the job's latest run, polled: accounting lags the controller a moment."""
    for _ in range(100):
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"], env=env,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        if out and out[-1].split("|")[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", ""):
            return tuple(out[-1].split("|"))
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {out}")


def wait_gone(job_id, env, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        q = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True)
        if not q.stdout.strip():
            return
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], env=env)
    raise AssertionError(f"job {job_id} still queued after {timeout} s; cancelled")


def sbatch_template(env, tmp_path, run_dir, cache, *extra):
    """The sbatch template with the ci profile sourced, as a user would submit it."""
    cmd = ("source slurm/profiles/ci.env && sbatch --parsable --ntasks-per-node=2 --time=10 "
           f"--output={tmp_path}/train-%j.out slurm/train.sbatch tiny run_dir={run_dir} data.cache_dir={cache} "
           + " ".join([*FAST, *extra]))  # fmt: skip
    r = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def reference(slurm_cluster, cache, tmp_path_factory):
    """Uninterrupted: slurm/train.sbatch, 1 node x 2 tasks."""
    tmp = tmp_path_factory.mktemp("template")
    run_dir = tmp / "run"
    t0 = time.time()
    job = sbatch_template(slurm_cluster, tmp, run_dir, cache)
    wait_gone(job, slurm_cluster)
    state = sacct(job, slurm_cluster)
    TIMES["sbatch template, 1x2 tasks"] = time.time() - t0
    log = (tmp / f"train-{job}.out").read_text()
    assert state == ("COMPLETED", "0:0"), log[-3000:]
    return run_dir, log


def test_sbatch_template_trains_with_two_tasks(reference):
    run_dir, log = reference
    assert "tp=1 pp=1 dp=2 world=2 backend=gloo" in log
    steps = trace(run_dir)
    assert [s for s, *_ in steps] == list(range(1, STEPS + 1))
    assert steps[-1][1] < steps[0][1] - 0.5  # it learns
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    for name in ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "config.yaml"):
        assert (ckpts / f"step_{STEPS:08d}" / name).is_file()


def run_cli(env, *args, timeout=60):
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_launch_preempted_requeues_and_resumes_to_the_same_trace(reference, slurm_cluster, cache, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    proc = subprocess.Popen([*CLI, *LAUNCH, "--gpus-per-node", "2", f"run_dir={run_dir}", f"data.cache_dir={cache}",
                             *FAST, "tracking.backends=[console,mlflow]"],
                            env=slurm_cluster, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    job = None
    try:
        line = proc.stdout.readline()
        job = re.search(r"submitted job (\d+)", line).group(1)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.exists() and '"step": 2,' in metrics.read_text()):
            assert time.time() < deadline and proc.poll() is None, "training did not reach step 2"
            time.sleep(0.1)
        mlflow_run = json.loads((run_dir / "mlflow_run.json").read_text())
        subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster, check=True)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", job], env=slurm_cluster) if job else None
    TIMES["launch slurm 1x2 tasks, preempted + requeued"] = time.time() - t0
    out = line + out
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert f"job {job} was requeued (restart 1)" in out
    assert "exiting with code 75" in out and "resuming at step" in out
    assert re.search(rf"job {job} COMPLETED .*requeued 1x; latest checkpoint .*step_{STEPS:08d}", out)
    stopped_at = int(re.search(r"checkpointed step (\d+)", out).group(1))
    assert 2 <= stopped_at < STEPS
    # value for value the uninterrupted run's trace
    assert trace(run_dir) == trace(reference[0])
    # the requeued job continued the same MLflow run, tagged with the Slurm job id
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == mlflow_run["run_id"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(mlflow_run["run_id"])
    assert run.data.tags.get("slurm_job_id") == job and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in history] == list(range(1, STEPS + 1))
    assert [v for _, v in history] == pytest.approx([v for _, v, *_ in trace(reference[0])], rel=1e-12)


def test_two_nodes_by_two_tasks(reference, slurm_cluster, cache, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    r = run_cli(slurm_cluster, *LAUNCH, "--nodes", "2", "--gpus-per-node", "2", f"run_dir={run_dir}",
                f"data.cache_dir={cache}", *FAST, timeout=400)  # fmt: skip
    TIMES["launch slurm 2x2 tasks"] = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tp=1 pp=1 dp=4 world=4 backend=gloo" in r.stdout
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    nodes = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "NodeList"], env=slurm_cluster,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    assert nodes[-1] == "n[1-2]"
    got, want = trace(run_dir), trace(reference[0])
    assert [s for s, *_ in got] == [s for s, *_ in want]
    for g, w in zip(got, want):  # 4 ranks instead of 2: float32 sums in another order
        assert g == pytest.approx(w, rel=1e-5, abs=1e-6), (g, w)


def test_failing_job_reaches_the_user(slurm_cluster, cache, tmp_path):
    """train.device=cuda passes every check on the login node but fails on these CPU-only nodes."""
    t0 = time.time()
    tmpl_job = sbatch_template(slurm_cluster, tmp_path, tmp_path / "tmpl", cache, "train.device=cuda")
    r = run_cli(slurm_cluster, *LAUNCH, "--gpus-per-node", "2", f"run_dir={tmp_path / 'run'}",
                f"data.cache_dir={cache}", *FAST, "train.device=cuda", timeout=300)  # fmt: skip
    TIMES["launch slurm, failing job"] = time.time() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("megatron-elastic: error:")]
    assert len(err) == 1, r.stderr
    assert re.search(r"job \d+ FAILED: rank 0 exited with code 2: launch/train.py: error: train.device=cuda but no "
                     r"CUDA device is available", err[0]), err[0]  # fmt: skip
    wait_gone(tmpl_job, slurm_cluster)
    assert sacct(tmpl_job, slurm_cluster) == ("FAILED", "2:0")
    log = (tmp_path / f"train-{tmpl_job}.out").read_text()
    assert "error: train.device=cuda but no CUDA device is available" in log


def test_errors_before_submission(slurm_cluster, tmp_path):
    cases = {
        "unknown partition": (["--partition", "h100"],
                              "partition 'h100' does not exist on this cluster; choose one of: debug"),
        "too many GPUs": (["--gpus-per-node", "4"],
                          "--gpus-per-node 4 but the nodes of partition 'debug' have at most 2"),
        "missing config": (["--config", str(tmp_path / "nope.yaml")], "nope.yaml' does not exist"),
        "too many nodes": (["--nodes", "3"], "--nodes 3 but partition 'debug' has only 2 node(s)"),
        "does not fit": (["--gpu-memory", "1MB"], "the job does not fit: stage 1 ("),
    }  # fmt: skip
    procs = {name: subprocess.Popen([*CLI, *LAUNCH, *args, f"run_dir={tmp_path / name}"], env=slurm_cluster, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}  # fmt: skip
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (name, out, err)
        assert err.count("\n") == 1 and err.startswith("megatron-elastic: error: "), (name, err)
        assert cases[name][1] in err, (name, err)
        assert out == "" and not (tmp_path / name).exists(), name  # nothing submitted, nothing written


def test_dry_run_prints_the_batch_script(slurm_cluster, tmp_path):
    r = run_cli(slurm_cluster, *LAUNCH, "--nodes", "2", "--gpus-per-node", "2", "--dry-run",
                f"run_dir={tmp_path / 'r'}", "train.global_batch_size=32")  # 4 ranks x micro-batch 8  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "plan: " in r.stderr and "ok: fits" in r.stderr  # the plan goes to stderr, the script alone to stdout
    script = r.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --partition=debug", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 "export OMP_NUM_THREADS=1",
                 'scontrol requeue "$SLURM_JOB_ID"', "launch/train.py --config"):  # fmt: skip
        assert line in script, line
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "r").exists()


def test_node_names_resolve_through_slurm(slurm_cluster):
    """The emulated nodes' names are not in DNS; their NodeAddr is what ranks connect to."""
    from megatron_elastic.slurm.env import hostnames, node_address

    assert hostnames("n[1-2]") == ["n1", "n2"]
    assert node_address("n1") == "127.0.0.1"


def submit_template(env, script, *args, sbatch=()):
    r = subprocess.run(["bash", "-c", 'source slurm/profiles/ci.env && sbatch --parsable "$@"', "sbatch", *sbatch,
                        script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def test_pipeline_templates_importance_elastic_extract_eval(reference, slurm_cluster, cache, tmp_path):
    """importance.sbatch -> train.sbatch (elastic, 2 tasks) -> extract-eval.sbatch (array, one task per budget)."""
    from megatron_elastic.api import load_pretrained

    parent_ckpt = reference[0] / "checkpoints" / f"step_{STEPS:08d}"
    data = [f"data.cache_dir={cache}", "data.builtin_max_mb=0.5", "data.seq_len=32"]
    t0 = time.time()
    job = submit_template(slurm_cluster, "slurm/importance.sbatch", str(parent_ckpt), str(tmp_path / "imp"),
                          "--batches", "2", "--batch-size", "2", "--seq-len", "32", *data,
                          sbatch=[f"--output={tmp_path}/imp-%j.out"])  # fmt: skip
    wait_gone(job, slurm_cluster)
    assert sacct(job, slurm_cluster) == ("COMPLETED", "0:0"), (tmp_path / f"imp-{job}.out").read_text()[-3000:]
    TIMES["importance.sbatch"] = time.time() - t0
    order = json.loads((tmp_path / "imp" / "ranking.json").read_text())["depth"]["order"]
    assert sorted(order) == list(range(7))

    t0 = time.time()
    job = submit_template(slurm_cluster, "slurm/train.sbatch", "elastic-tiny",
                          f"elastic.parent={tmp_path / 'imp' / 'parent'}", f"run_dir={tmp_path / 'el'}", *data,
                          "train.micro_batch_size=2", "train.global_batch_size=4",
                          "train.max_steps=4", "train.warmup_steps=1", "train.eval_interval=0", "train.eval_batches=1",
                          "train.save_interval=0", "distill.stage2_start_step=2",
                          sbatch=["--ntasks-per-node=2", "--time=10", f"--output={tmp_path}/el-%j.out"])  # fmt: skip
    wait_gone(job, slurm_cluster)
    log = (tmp_path / f"el-{job}.out").read_text()
    assert sacct(job, slurm_cluster) == ("COMPLETED", "0:0"), log[-3000:]
    TIMES["train.sbatch elastic, 1x2 tasks"] = time.time() - t0
    assert "dp=2 world=2" in log
    ckpt = tmp_path / "el" / "many-in-one"
    assert json.loads((ckpt / "elastic.json").read_text())["budgets"] == [1.0, 0.75, 0.5]

    t0 = time.time()
    env = {**slurm_cluster, "MEGATRON_ELASTIC_EVAL_TASKS": "loss"}  # the job inherits it (sbatch --export=ALL)
    job = submit_template(env, "slurm/extract-eval.sbatch", str(ckpt), str(tmp_path / "children"), *data,
                          sbatch=["--array=0-3", "--time=10", f"--output={tmp_path}/ee-%A_%a.out"])  # fmt: skip
    wait_gone(job, env)
    TIMES["extract-eval.sbatch, array of 4"] = time.time() - t0
    for i in range(4):
        assert sacct(f"{job}_{i}", env) == ("COMPLETED", "0:0"), (tmp_path / f"ee-{job}_{i}.out").read_text()[-3000:]
    assert "only 3 budgets; nothing to do" in (tmp_path / f"ee-{job}_3.out").read_text()
    full = load_pretrained(ckpt).num_parameters()
    params = {}
    for b in ("1.0", "0.75", "0.5"):
        report = json.loads((tmp_path / "children" / f"eval-{b}" / "eval.json").read_text())
        result = report["results"][next(iter(report["results"]))]
        child = load_pretrained(tmp_path / "children" / f"budget-{b}")  # the extracted Hugging Face checkpoint
        assert child.num_parameters() == result["parameters"] and result["loss"] < 6.0
        assert set(result) >= {"loss", "bpb"} and "recall" not in result  # MEGATRON_ELASTIC_EVAL_TASKS=loss
        params[b] = result["parameters"] / full
    assert params["1.0"] == 1.0 and params["0.75"] <= 0.75 + 0.05 and params["0.5"] <= 0.5 + 0.05
