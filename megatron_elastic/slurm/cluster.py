"""What the Slurm cluster offers (partitions, nodes, CPUs and GPUs per node), read from ``sinfo``,
and the checks a request must pass before anything is submitted."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

from megatron_elastic.errors import UserError

NO_CLUSTER_HINT = ("run on a Slurm login node, or start the local test cluster as root with "
                   "`bash slurm/ci/up.sh` and `source /tmp/megatron-elastic-slurm/slurm.env`")  # fmt: skip


@dataclass
class Partition:
    name: str
    num_nodes: int = 0
    max_cpus_per_node: int = 0
    max_gpus_per_node: int = 0
    available: bool = True
    default: bool = False
    nodes: list[str] = field(default_factory=list)


def gpus_in_gres(gres: str) -> int:
    """GPUs in one node's gres string: ``gpu:8``, ``gpu:h100:8(S:0-1)``, ``gpu:a:2,gpu:b:2,nic:1`` (4)."""
    total = 0
    for item in gres.split(","):
        item = re.sub(r"\(.*?\)", "", item).strip()
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2:
            count = re.match(r"\d+", parts[-1])
            total += int(count.group(0)) if count else 1
    return total


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"{cmd[0]!r} not found: this is not a Slurm machine; {NO_CLUSTER_HINT}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(cmd)}` did not answer within 60 s; is slurmctld up? ({NO_CLUSTER_HINT})") from None
    if out.returncode != 0:
        detail = " ".join((out.stderr or out.stdout).split()) or f"exit code {out.returncode}"
        raise UserError(f"`{' '.join(cmd)}` failed ({detail}); is slurmctld reachable? ({NO_CLUSTER_HINT})")
    return out.stdout


def partitions() -> dict[str, Partition]:
    """Every partition of the cluster, from one ``sinfo`` call (one line per node)."""
    text = _run(["sinfo", "--noheader", "--Node", "--format=%P|%N|%c|%G|%a"])
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, node, cpus, gres, avail = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        part = parts.setdefault(name, Partition(name, default=default))
        if node not in part.nodes:
            part.nodes.append(node)
            part.num_nodes += 1
        part.max_cpus_per_node = max(part.max_cpus_per_node, int(cpus) if cpus.isdigit() else 0)
        part.max_gpus_per_node = max(part.max_gpus_per_node, gpus_in_gres(gres))
        part.available = part.available and avail == "up"
    return parts


def check_request(partition: str | None, *, nodes: int, gpus_per_node: int, tasks_per_node: int,
                  cpus_per_task: int) -> Partition:  # fmt: skip
    """The partition the job will run in, after checking that the request fits it (UserError otherwise)."""
    parts = partitions()
    if not parts:
        raise UserError(f"sinfo lists no partitions; {NO_CLUSTER_HINT}")
    if partition is None:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise UserError(f"this cluster has no default partition; pass --partition (one of: {', '.join(parts)})")
        part = defaults[0]
    elif partition not in parts:
        raise UserError(f"partition {partition!r} does not exist on this cluster; choose one of: {', '.join(parts)}")
    else:
        part = parts[partition]
    if not part.available:
        raise UserError(f"partition {part.name!r} is not up (sinfo shows it unavailable); "
                        "choose another with --partition")
    if nodes > part.num_nodes:
        raise UserError(f"--nodes {nodes} but partition {part.name!r} has only {part.num_nodes} node(s); "
                        f"ask for at most {part.num_nodes}")  # fmt: skip
    if gpus_per_node > part.max_gpus_per_node:
        raise UserError(f"--gpus-per-node {gpus_per_node} but the nodes of partition {part.name!r} have at most "
                        f"{part.max_gpus_per_node} GPU(s); ask for at most {part.max_gpus_per_node}")  # fmt: skip
    if tasks_per_node * cpus_per_task > part.max_cpus_per_node:
        raise UserError(f"{tasks_per_node} task(s) per node x {cpus_per_task} CPU(s) per task = "
                        f"{tasks_per_node * cpus_per_task} CPUs, but the nodes of partition {part.name!r} have at most "
                        f"{part.max_cpus_per_node}; lower --cpus-per-task")  # fmt: skip
    return part
