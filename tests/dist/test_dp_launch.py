"""Data parallelism through launch/train.py with real gloo processes: DP=2 under torchrun and under
plain env:// reproduces the single-process loss trace; a stop signal reaching one rank makes every
rank checkpoint and exit 75, and the resumed run continues the single-process trace (at DP=2 from
the single-process format, at TP=2 from megatron-core dist_checkpointing shards, where the resumed
trace also equals an uninterrupted TP=2 run exactly)."""

import time

import pytest
from launching import env_launch, single, torchrun, train_records

# Loss / grad-norm agreement with the single process: float32 reductions in another order.
RTOL, ATOL = 1e-5, 1e-6
STEPS = 10
FAST = ["--config", "tiny", "data.builtin_max_mb=0.5", "data.seq_len=64", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.log_interval=1", "train.eval_batches=2",
        "train.eval_interval=0", f"train.max_steps={STEPS}"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    r = single(*FAST, f"run_dir={run_dir}", f"data.cache_dir={cache}")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = train_records(run_dir)
    assert [x["step"] for x in recs] == list(range(1, STEPS + 1))
    return recs


def assert_same_trace(got, want, rtol=RTOL, atol=ATOL):
    assert [x["step"] for x in got] == [x["step"] for x in want]
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm", "lr"):
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=atol), (g["step"], key, g[key], w[key])


def test_torchrun_dp2_matches_single_process(reference, cache, tmp_path):
    run_dir = tmp_path / "run"
    r = torchrun(2, *FAST, f"run_dir={run_dir}", f"data.cache_dir={cache}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tp=1 pp=1 dp=2 world=2 backend=gloo" in r.stdout
    assert_same_trace(train_records(run_dir), reference)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


# DP=2 writes the single-process format (every rank holds the whole model); TP=2 writes megatron-core
# dist_checkpointing shards. TP reorders reductions (all-reduced partial matmuls, vocabulary-parallel
# softmax): the tensor-parallel tolerance of tests/dist/layouts.py.
SIGNAL_LAYOUTS = [pytest.param([], RTOL, ATOL, False, id="dp2"),
                  pytest.param(["parallel.tp=2"], 1e-4, 1e-5, True, id="tp2")]  # fmt: skip


@pytest.mark.parametrize("layout, rtol, atol, dist_format", SIGNAL_LAYOUTS)
def test_env_signal_on_one_rank_checkpoints_and_resumes(reference, cache, tmp_path, layout, rtol, atol, dist_format):
    import signal

    from megatron_elastic.checkpoint.native import is_dist_checkpoint

    run_dir = tmp_path / "run"
    args = [*FAST, f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.save_interval=0", *layout]
    procs = env_launch(2, *args)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one rank only: the ranks must agree to stop together
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outs
    done = train_records(run_dir)
    assert 2 <= done[-1]["step"] < STEPS, "the signal arrived after the last step; the test needs a slower run"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{done[-1]['step']:08d}"
    assert is_dist_checkpoint(run_dir / "checkpoints" / latest) == dist_format

    procs = env_launch(2, *args)
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    resumed = train_records(run_dir)
    assert_same_trace(resumed, reference, rtol, atol)
    if dist_format:  # the same layout uninterrupted: a resume from the shards is exact
        straight = tmp_path / "straight"
        r = torchrun(2, *FAST, f"run_dir={straight}", f"data.cache_dir={cache}", "train.save_interval=0", *layout)
        assert r.returncode == 0, r.stdout + r.stderr
        assert [(x["step"], x["loss"], x["grad_norm"]) for x in resumed] == [
            (x["step"], x["loss"], x["grad_norm"]) for x in train_records(straight)]  # fmt: skip


@pytest.mark.parametrize("extra, env, message", [
    (["parallel.tp=2"], {}, "world size 1 is not a multiple of parallel.tp * parallel.pp = 2"),
    (["parallel.dp=3"], {"WORLD_SIZE": "2"}, "parallel.dp=3 but 2 processes"),
    (["parallel.pp=2"], {"WORLD_SIZE": "2"}, "parallel.pp > 1 needs CUDA devices"),
    (["parallel.distributed_optimizer=true"], {}, "parallel.distributed_optimizer=true need CUDA devices"),
    (["parallel.backend=mpi"], {}, "parallel.backend='mpi' is invalid"),
])  # fmt: skip
def test_launch_rejects_bad_layouts_before_any_rendezvous(tmp_path, extra, env, message):
    import subprocess

    from launching import BASE_ENV, ENTRY, PYTHON

    run_dir = tmp_path / "run"
    r = subprocess.run([PYTHON, ENTRY, *FAST, f"run_dir={run_dir}", "train.device=cpu", *extra], capture_output=True,
                       text=True, timeout=120, env={**BASE_ENV, **env}, check=False)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not run_dir.exists()  # nothing written
