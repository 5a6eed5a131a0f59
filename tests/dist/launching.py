"""Helpers of the distributed tests: free loopback ports, env:// and torchrun launches of
launch/train.py, metric traces."""

import json
import os
import subprocess
import sys
from pathlib import Path

from spawning import free_port

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENTRY = str(REPO / "launch" / "train.py")
# Worker processes use one thread each: the test machine has two cores for two ranks.
BASE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, f"--nproc-per-node={nproc}", f"--master-port={free_port()}", "--master-addr=127.0.0.1", ENTRY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=BASE_ENV, check=False)


def env_launch(nproc: int, *args: str) -> list[subprocess.Popen]:
    """``nproc`` plain processes that find each other through RANK / WORLD_SIZE / MASTER_* (env://)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**BASE_ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen([PYTHON, ENTRY, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    return procs


def single(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """The single-process trainer (``megatron-elastic train``) on the same arguments: the reference."""
    exe = str(Path(sys.executable).parent / "megatron-elastic")
    return subprocess.run([exe, "train", *args], capture_output=True, text=True, timeout=timeout, env=BASE_ENV,
                          check=False)  # fmt: skip


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]
