"""The real Slurm cluster the tests in this folder submit to.

``slurm_cluster`` (once per test run) makes sure the local test cluster of ``slurm/ci/up.sh`` runs: as root it
runs ``up.sh`` (idempotent: a healthy cluster is kept, a missing one is installed and started, and
one started here is stopped again at the end of the run); as another user it fails with one
line saying how to start it. It never skips: a test run without its cluster must not look green.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_ROOT = Path(os.environ.get("SLURM_CI_ROOT", "/tmp/megatron-elastic-slurm"))
SLURM_CONF = SLURM_ROOT / "etc" / "slurm.conf"
HOW_TO_START = "start the test cluster as root with `bash slurm/ci/up.sh` (see docs/slurm.md), then rerun"


def _healthy(env) -> bool:
    try:
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True,
                               timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    up = [ln for ln in nodes.stdout.splitlines() if ln.split()[-1] in ("idle", "mixed", "allocated", "completing")]
    return ping.returncode == 0 and "UP" in ping.stdout and len(up) >= 2


@pytest.fixture(scope="session")
def slurm_cluster():
    """Environment (SLURM_CONF set) of a running test cluster with 2 nodes x 2 (fake) GPUs."""
    env = {**os.environ, "SLURM_CONF": str(SLURM_CONF)}
    started = False
    if os.geteuid() == 0:
        was_up = SLURM_CONF.is_file() and _healthy(env)
        t0 = time.time()
        r = subprocess.run(["bash", str(REPO / "slurm" / "ci" / "up.sh")], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            detail = (r.stderr or r.stdout).strip()[-2000:]
            pytest.fail(f"slurm/ci/up.sh failed (exit {r.returncode}): {detail}", pytrace=False)
        started = not was_up
        if started:
            print(f"\n[slurm] started the test cluster in {time.time() - t0:.1f} s")
    elif not (SLURM_CONF.is_file() and _healthy(env)):
        pytest.fail(f"no Slurm test cluster at {SLURM_ROOT}: {HOW_TO_START}", pytrace=False)
    os.environ["SLURM_CONF"] = str(SLURM_CONF)  # submitit and the CLI run sbatch/sacct from this process
    yield env
    if started:
        subprocess.run(["bash", str(REPO / "slurm" / "ci" / "down.sh")], capture_output=True, text=True, timeout=300)
