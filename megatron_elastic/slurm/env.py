"""The ``env://`` variables torch.distributed reads, derived from Slurm's own environment.

Under ``srun`` every task gets ``SLURM_PROCID`` (global rank), ``SLURM_NTASKS`` (world size),
``SLURM_LOCALID`` (rank on its node) and the job's node list; torchrun sets ``RANK`` etc. itself.
:func:`torch_env_from_slurm` fills only the variables that are missing, so a torchrun launch inside
an allocation keeps torchrun's values.
"""

from __future__ import annotations

import os
import subprocess

# Ports 20000..39999; the same job id (also after a requeue) always gets the same port.
_PORT_BASE, _PORT_SPAN = 20000, 20000


def master_port(job_id: str | int) -> int:
    """A rendezvous port that is a pure function of the Slurm job id."""
    return _PORT_BASE + int(str(job_id).split("_")[0]) % _PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``n[1-3]`` -> ``n1``), through ``scontrol show hostnames``."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


def torch_env_from_slurm(environ: dict | None = None) -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM_* when unset.

    Returns the values it set (empty outside Slurm or when torchrun already set them)."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env or "RANK" in env:
        return {}
    job_id = env.get("SLURM_JOB_ID", "0")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    values = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(job_id)),
    }
    values["MASTER_ADDR"] = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
    env.update(values)
    return values
