"""Submitting training to Slurm through submitit, with preemption handled by requeue.

The batch script submitit writes runs ``srun`` with one task per GPU; every task unpickles a
:class:`TrainTask` and runs ``launch/train.py`` as a child process (rank, world size and master
address come from the task's SLURM_* variables, see :mod:`megatron_elastic.slurm.env`).

Preemption: ``--signal=USR1@S`` asks Slurm to send SIGUSR1 to every task S seconds before the time
limit (``scancel --signal=USR1`` does the same by hand). The trainer finishes its step, all ranks
agree, rank 0 writes a checkpoint, every rank exits with 75. The batch script then runs
``scontrol requeue`` on its own job id: same job id, so the same master port, log files, submitit
folder and run directory; the requeued job resumes from the checkpoint into the same MLflow run.

Why ``scontrol requeue`` after srun rather than submitit's own checkpoint/requeue: submitit's
handler runs inside the signal handler of rank 0's process (mid-step, before the other ranks have
agreed or rank 0 has saved), and only for its own USR2; the requeue decision has to follow the
trainer's checkpoint, i.e. the exit code of *all* tasks, which only the batch script sees. The same
rule works for the plain sbatch templates in ``slurm/``.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_elastic.errors import UserError
from megatron_elastic.training.signals import EXIT_REQUEUE

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_ENTRY = REPO_ROOT / "launch" / "train.py"
DEFAULT_SIGNAL_S = 120
DEFAULT_MAX_REQUEUES = 20

# Appended to the batch script after the srun line: $? is srun's exit status (the highest of the tasks').
_REQUEUE_LINES = [
    "rc=$?  # srun's exit status; 75 = every rank checkpointed after a stop signal",
    f'if [ "$rc" -eq {EXIT_REQUEUE} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt "$MEGATRON_ELASTIC_MAX_REQUEUES" ]; then',
    '  echo "[slurm] job $SLURM_JOB_ID checkpointed after a stop signal;"'
    ' "requeueing (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"',
    '  scontrol requeue "$SLURM_JOB_ID"',
    "fi",
    'exit "$rc"',
]


def parse_time(text: str) -> int:
    """Slurm's time formats (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) -> whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise UserError(f"--time {text!r} is not a Slurm time; write minutes (30), H:M:S (4:00:00) or D-H:M:S")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + (int(c or 0) + 59) // 60
    elif c is not None:  # H:M:S
        minutes = int(a) * 60 + int(b) + (int(c) + 59) // 60
    elif b is not None:  # M:S
        minutes = int(a) + (int(b) + 59) // 60
    else:
        minutes = int(a)
    if minutes <= 0:
        raise UserError(f"--time {text!r} is zero; give the job some time, e.g. --time 30")
    return minutes


@dataclass
class LaunchRequest:
    """Everything a submission needs, validated before anything reaches Slurm."""

    config: str
    """The recipe, resolved to an absolute path (the job may start in another directory)."""
    overrides: list[str]
    run_dir: Path
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    time_min: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "megatron-elastic"
    signal_s: int = DEFAULT_SIGNAL_S
    max_requeues: int = DEFAULT_MAX_REQUEUES
    srun_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    folder: Path | None = None
    mem: str = "0"
    """``--mem`` per node; ``0`` = all of it."""
    exclusive: bool = True
    """Whole nodes: no other job shares the GPUs' PCIe, NVLink and InfiniBand links or the host memory."""
    container_image: str | None = None
    """pyxis image around every task; the mounts below are added for it."""
    container_mounts: list[str] = field(default_factory=list)
    """``SRC:DST`` mounts for the container: the checkout, the run directory, the recipe's inputs, the profile's."""
    plan: object = None
    """The job's :class:`~megatron_elastic.parallel.plan.Plan` (GPU jobs), written beside the batch script."""
    missing_inputs: list[str] = field(default_factory=list)
    """Inputs of the recipe not found on this machine (a dry run warns, a submission refuses)."""
    run_config: object = None
    """The loaded recipe (:class:`~megatron_elastic.config.RunConfig`) the plan is made from."""

    def srun_arguments(self) -> list[str]:
        """Extra ``srun`` arguments: the container's (pyxis), then the profile's own."""
        if not self.container_image:
            return list(self.srun_args)
        return [f"--container-image={self.container_image}", f"--container-mounts={','.join(self.container_mounts)}",
                f"--container-workdir={REPO_ROOT}", "--no-container-mount-home", *self.srun_args]  # fmt: skip

    @property
    def log_folder(self) -> Path:
        return self.folder or (self.run_dir / "slurm")

    def executor_parameters(self) -> dict:
        """Parameters of ``submitit.SlurmExecutor.update_parameters``."""
        setup = [
            "# every task runs (submitit unpickles megatron_elastic.slurm.submit.TrainTask):",
            "#   " + shlex.join(self.task().command()),
            # A stray USR1 to the batch shell itself (scancel -b) must not kill it: it has to requeue.
            "trap 'echo \"[slurm] batch shell got a stop signal; the tasks get it from Slurm\"' USR1 USR2",
            f"export MEGATRON_ELASTIC_MAX_REQUEUES={self.max_requeues}",
            # srun does not inherit sbatch's --cpus-per-task since Slurm 22.05; threads follow the CPUs a rank
            # has, not whatever OMP_NUM_THREADS the submitting shell had (a profile may still set it below).
            f"export SRUN_CPUS_PER_TASK={self.cpus_per_task}",
            f"export OMP_NUM_THREADS={self.cpus_per_task}",
            *(f"export {k}={shlex.quote(v)}" for k, v in self.env.items()),
            'echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        ]
        params = {
            "job_name": self.job_name,
            "time": self.time_min,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "setup": setup,
            "teardown": list(_REQUEUE_LINES),
            "srun_args": self.srun_arguments(),
            "mem": self.mem,
            # submitit's own default is USR2@90 handled by submitit's requeue; ours is USR1, see above.
            "additional_parameters": {"signal": f"USR1@{self.signal_s}", "requeue": True},
        }
        if self.exclusive:
            params["exclusive"] = True
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[key] = getattr(self, key)
        return params

    def task(self) -> "TrainTask":
        return TrainTask(python=self.python, entry=str(TRAIN_ENTRY), config=self.config, overrides=list(self.overrides))


def recipe_inputs(cfg) -> list[tuple[str, str, str]]:
    """The recipe's inputs on disk, ``(key, path, kind)``: kind ``prefix`` (a dataset's ``.bin`` / ``.idx``
    pair), ``file`` (the tokenizer, the ranking) or ``dir`` (the parent); the built-in ones are left out."""
    d = cfg.data
    out = [(f"data.{key}", getattr(d, key), "prefix") for key in ("train_prefix", "valid_prefix")]
    out.append(("data.tokenizer", d.tokenizer, "file"))
    if cfg.elastic is not None:
        out += [("elastic.parent", cfg.elastic.parent, "dir"), ("elastic.ranking", cfg.elastic.ranking, "file")]
    return [(key, path, kind) for key, path, kind in out if path and path != "builtin"]


def container_mounts(cfg, run_dir: Path, extra: list[str]) -> list[str]:
    """pyxis mounts for a run: the checkout, the run directory, the directories of the recipe's inputs
    (:func:`recipe_inputs`) that lie outside both, then ``extra``; each at its own path."""
    dirs = [Path(p).resolve() if kind == "dir" else Path(p).resolve().parent for _, p, kind in recipe_inputs(cfg)]
    mounts: list[Path] = []
    for d in [REPO_ROOT, run_dir.resolve(), *dirs]:
        if not any(d == m or m in d.parents for m in mounts):
            mounts = [m for m in mounts if d not in m.parents] + [d]
    return [f"{m}:{m}" for m in mounts] + list(extra)


def batch_script(req: LaunchRequest) -> str:
    """The batch script submitit will submit for ``req`` (what ``--dry-run`` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    # The command and the function SlurmExecutor uses when it submits (its _submitit_command_str and
    # _make_submission_file_text); called directly so that a dry run needs no srun on this machine.
    folder = shlex.quote(str(req.log_folder / "%j"))
    command = " ".join([shlex.quote(req.python), "-u -m submitit.core._submit", folder])
    return _make_sbatch_string(command=command, folder=req.log_folder / "%j", **req.executor_parameters())


class TrainTask:
    """What every Slurm task runs: ``launch/train.py`` as a child process with the task's environment.

    A child process and not an in-process call: the trainer owns its signal handlers (submitit's
    wrapper installs its own), and CUDA / NCCL state dies with it. Stop signals that reach this
    wrapper are passed on to the child (Slurm usually signals both; a second one is harmless)."""

    def __init__(self, *, python: str, entry: str, config: str, overrides: list[str]):
        self.python, self.entry, self.config, self.overrides = python, entry, config, overrides

    def command(self) -> list[str]:
        return [self.python, "-u", self.entry, "--config", self.config, *self.overrides]

    def __call__(self) -> dict:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        proc = subprocess.Popen(self.command(), stderr=subprocess.PIPE, text=True, errors="replace")
        forward = {signal.SIGUSR1: signal.SIGUSR1, signal.SIGUSR2: signal.SIGUSR1, signal.SIGTERM: signal.SIGTERM}
        for sig, to in forward.items():
            signal.signal(sig, lambda _s, _f, to=to: proc.poll() is None and proc.send_signal(to))
        tail: collections.deque[str] = collections.deque(maxlen=40)

        def pump():  # stderr goes to the task's log as it comes, and its tail into the error report
            for line in proc.stderr:
                sys.stderr.write(line)
                sys.stderr.flush()
                tail.append(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        code = proc.wait()
        reader.join(timeout=10)
        if code == EXIT_REQUEUE:
            # No result file on purpose: the job is not over, the batch script requeues it.
            print(f"[slurm] rank {rank}: checkpointed after a stop signal (exit {code})", flush=True)
            sys.stdout.flush()
            os._exit(EXIT_REQUEUE)
        if code != 0:
            raise TaskFailed(rank, code, list(tail))
        return {"rank": rank, "exit_code": 0}


class TaskFailed(RuntimeError):
    """A rank's training process failed; the message carries its exit code and last error line."""

    def __init__(self, rank: int, code: int, tail: list[str]):
        self.rank, self.code, self.tail = rank, code, tail
        super().__init__(f"rank {rank} exited with code {code}: {error_line(tail) or '(no error output)'}")


def error_line(lines: list[str]) -> str:
    """The most telling line of a failed process's stderr: an ``error:`` line, else the last exception line."""
    for line in reversed(lines):
        if ": error: " in line or line.startswith("error:"):
            return line.strip()
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line.strip()):
            return line.strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


# ---------------------------------------------------------------------------- submit and follow
@dataclass
class Outcome:
    job_id: str
    state: str
    exit_code: int
    seconds: float
    requeues: int
    message: str = ""


def submit(req: LaunchRequest):
    """Submit ``req``; returns the submitit job."""
    import submitit

    req.log_folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=req.log_folder / "%j", python=shlex.quote(req.python))
    executor.update_parameters(**req.executor_parameters())
    job = executor.submit(req.task())
    if req.plan is not None:  # beside the job's batch script (submitit writes it to FOLDER/JOBID)
        from megatron_elastic.parallel.plan import format_plan

        folder = req.log_folder / str(job.job_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plan.txt").write_text(format_plan(req.plan) + "\n")
        (folder / "plan.json").write_text(json.dumps(req.plan.to_dict(), indent=2) + "\n")
    return job


def log_paths(job) -> tuple[Path, Path]:
    """Rank 0's stdout and stderr files."""
    paths = job._sub_jobs[0].paths if getattr(job, "_sub_jobs", None) else job.paths
    return paths.stdout, paths.stderr


def job_state(job_id: str) -> tuple[str, int]:
    """(state of the job's latest run, number of requeues so far).

    The state comes from accounting (``sacct``), else from the controller while it still knows the
    job (accounting lags a moment, or is not configured); ``GONE`` when neither knows it."""
    acct = subprocess.run(["sacct", "-j", job_id, "-X", "--noheader", "--parsable2", "--format=State"],
                          capture_output=True, text=True)  # fmt: skip
    states = [s.split()[0] for s in acct.stdout.splitlines() if s.strip()]
    show = subprocess.run(["scontrol", "show", "job", job_id, "--oneliner"], capture_output=True, text=True)
    m = re.search(r"\bRestarts=(\d+)", show.stdout)
    restarts = int(m.group(1)) if m else 0
    if states:
        return states[-1], restarts
    m = re.search(r"\bJobState=(\S+)", show.stdout)
    return (m.group(1) if m else "GONE"), restarts


# Job states after which nothing more happens (REQUEUED, PREEMPTED and COMPLETING are not final).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "GONE"}  # fmt: skip


def follow(job, *, out=sys.stdout, poll_s: float = 10.0) -> Outcome:
    """Stream rank 0's log until the job is over (requeues included); the job's outcome.

    Accounting is asked every ``poll_s`` seconds, every second once the ranks have written results."""
    t0 = time.time()
    stdout_path, _ = log_paths(job)
    offset, state, requeues, last_poll = 0, "", 0, float("-inf")

    def drain():
        nonlocal offset
        if stdout_path.exists():
            with stdout_path.open("r", errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            if chunk:
                out.write(chunk)
                out.flush()

    while True:
        drain()
        results = all(p.exists() for p in _result_files(job))
        if time.time() - last_poll >= (1.0 if results else poll_s):
            last_poll = time.time()
            previous = state
            state, restarts = job_state(job.job_id)
            if state != previous and state in ("PENDING", "RUNNING"):
                out.write(f"[launch] job {job.job_id} {state}\n")
                out.flush()
            if restarts > requeues:
                requeues = restarts
                out.write(f"[launch] job {job.job_id} was requeued (restart {restarts}); "
                          "it resumes from its checkpoint\n")
                out.flush()
            if state in FINAL_STATES:
                break
        time.sleep(0.5)
    seconds = time.time() - t0
    drain()
    return _outcome(job, state, seconds, requeues)


def _result_files(job) -> list[Path]:
    subs = getattr(job, "_sub_jobs", None) or [job]
    return [s.paths.result_pickle for s in subs]


def _outcome(job, state: str, seconds: float, requeues: int) -> Outcome:
    """Read every rank's result (submitit pickles); the first failure's message."""
    from submitit.core import utils as sutils

    subs = getattr(job, "_sub_jobs", None) or [job]
    for sub in subs:
        if not sub.paths.result_pickle.exists():
            continue
        kind, value = sutils.pickle_load(sub.paths.result_pickle)
        if kind == "error":
            lines = str(value).strip().splitlines()
            msg = next((ln.split(": ", 1)[1] for ln in reversed(lines) if ln.startswith(__name__ + ".TaskFailed: ")),
                       lines[-1] if lines else "failed")  # fmt: skip
            return Outcome(job.job_id, state or "FAILED", 1, seconds, requeues, msg)
    missing = [s for s in subs if not s.paths.result_pickle.exists()]
    if missing or state not in ("COMPLETED", "GONE"):  # GONE: no accounting, the controller forgot the job
        stderr = missing[0].paths.stderr if missing else subs[0].paths.stderr
        tail = stderr.read_text(errors="replace").splitlines()[-40:] if stderr.exists() else []
        detail = error_line(tail) or f"see {stderr}"
        return Outcome(job.job_id, state, 1, seconds, requeues, f"ended without a result: {detail}")
    return Outcome(job.job_id, "COMPLETED", 0, seconds, requeues)


def summary(run_dir: Path) -> str:
    """Latest checkpoint and last logged loss of a run directory."""
    latest = run_dir / "checkpoints" / "latest"
    parts = []
    if latest.is_file():
        parts.append(f"latest checkpoint {run_dir / 'checkpoints' / latest.read_text().strip()}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        losses = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
        if losses:
            parts.append(f"step {losses[-1]['step']} loss {losses[-1]['loss']:.4f}")
    return ", ".join(parts)
