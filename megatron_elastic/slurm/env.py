"""The ``env://`` variables torch.distributed reads, derived from Slurm's own environment.

Under ``srun`` every task gets ``SLURM_PROCID`` (global rank), ``SLURM_NTASKS`` (world size),
``SLURM_LOCALID`` (rank on its node) and the job's node list; torchrun sets ``RANK`` etc. itself.
:func:`torch_env_from_slurm` fills only the variables that are missing, so a torchrun launch inside
an allocation keeps torchrun's values.

Only tasks of a job step (``SLURM_STEP_ID`` is set by ``srun``) are ranks: the batch script itself
also carries ``SLURM_PROCID=0`` and the allocation's ``SLURM_NTASKS``, and a ``python launch/train.py``
run there directly must stay a single process instead of waiting for ranks that never come.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

# Ports 20000..39999; the same job id (also after a requeue) always gets the same port.
_PORT_BASE, _PORT_SPAN = 20000, 20000


def master_port(job_id: str | int) -> int:
    """A rendezvous port that is a pure function of the Slurm job id."""
    return _PORT_BASE + int(str(job_id).split("_")[0]) % _PORT_SPAN


def hostnames(nodelist: str) -> list[str]:
    """Every host of a Slurm node list (``n[1-3]`` -> ``n1 n2 n3``), through ``scontrol show hostnames``."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``n[1-3]`` -> ``n1``)."""
    return hostnames(nodelist)[0]


def node_address(node: str) -> str:
    """An address other nodes can reach ``node`` at.

    The node name itself when it resolves (the usual case: no query to slurmctld, which matters when
    thousands of ranks start at once); otherwise the ``NodeAddr`` slurmctld knows for it (node names
    outside DNS, emulated nodes that all share one machine)."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except (socket.gaierror, UnicodeError):
        pass
    out = subprocess.run(["scontrol", "show", "node", node, "--oneliner"], capture_output=True, text=True)
    match = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return match.group(1) if match else node


def torch_env_from_slurm(environ: dict | None = None) -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM_* when unset.

    Returns the values it set (empty outside an ``srun`` step or when torchrun already set them)."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env or "RANK" in env:
        return {}
    job_id = env.get("SLURM_JOB_ID", "0")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    values = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(job_id)),
    }
    values["MASTER_ADDR"] = env.get("MASTER_ADDR") or (node_address(first_host(nodelist)) if nodelist else "127.0.0.1")
    env.update(values)
    return values
