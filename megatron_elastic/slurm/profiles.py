"""Cluster profiles: small shell files of ``export NAME=value`` lines (``slurm/profiles/*.env``).

One file serves both launchers. Sourced in a shell before ``sbatch slurm/train.sbatch``, sbatch reads
its ``SBATCH_*`` variables itself (partition, account, GPUs per node, ...) and the job inherits the
rest (NCCL settings); ``megatron-elastic launch slurm --profile NAME`` reads the same file: the
``SBATCH_*`` values (and ``MEGATRON_ELASTIC_CPUS_PER_TASK``) become defaults of its options,
``MEGATRON_ELASTIC_SRUN_ARGS`` extra ``srun`` arguments (e.g. pyxis' ``--container-image``),
``MEGATRON_ELASTIC_PYTHON`` the tasks' Python, ``MEGATRON_ELASTIC_CONTAINER_IMAGE`` (and
``MEGATRON_ELASTIC_CONTAINER_MOUNTS``) a pyxis container around every task, and every other variable an
``export`` line of the batch script. Only plain assignments are allowed (``$VAR`` is expanded, nothing
else is run).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from megatron_elastic.errors import UserError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "slurm" / "profiles"
_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class Profile:
    name: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    constraint: str | None = None
    srun_args: list[str] = field(default_factory=list)
    python: str | None = None
    """The tasks' Python (MEGATRON_ELASTIC_PYTHON), e.g. the one inside a container image."""
    mem: str = "0"
    """``--mem`` per node (SBATCH_MEM_PER_NODE); ``0`` = all of each node's memory (the job has the nodes to itself)."""
    exclusive: bool = True
    """``--exclusive`` (MEGATRON_ELASTIC_EXCLUSIVE=0 turns it off, e.g. on a shared test cluster)."""
    container_image: str | None = None
    """pyxis image every task runs in (MEGATRON_ELASTIC_CONTAINER_IMAGE)."""
    container_mounts: list[str] = field(default_factory=list)
    """Mounts besides the checkout, the run directory and the recipe's inputs (MEGATRON_ELASTIC_CONTAINER_MOUNTS,
    comma-separated ``SRC[:DST]``)."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables exported in the batch script (NCCL_*, CUDA_DEVICE_MAX_CONNECTIONS, ...)."""


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.env"))


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = PROFILE_DIR / f"{name_or_path}.env"
    if named.is_file():
        return named
    raise UserError(f"cluster profile {name_or_path!r} not found; give a file or one of: {', '.join(available())}")


def _int(value: str, key: str, path: Path) -> int:
    if not value.isdigit():
        raise UserError(f"{key}={value!r} in profile {str(path)!r} is not a whole number; fix the profile")
    return int(value)


def _strip_comment(value: str) -> str:
    """``value`` without a trailing shell comment: a ``#`` that starts an unquoted word, as bash reads it
    (``nvcr.io#nvidia/pytorch`` keeps its ``#``; shlex's comment rule would cut it there)."""
    quote = None
    for i, ch in enumerate(value):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or value[i - 1].isspace()):
            return value[:i]
    return value


def load_profile(name_or_path: str) -> Profile:
    path = resolve(name_or_path)
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise UserError(f"profile {str(path)!r} line {number} is not `export NAME=value`: {line!r}; "
                            "fix the profile")
        name, value = match.groups()
        try:
            words = shlex.split(_strip_comment(value))
        except ValueError:
            raise UserError(f"profile {str(path)!r} line {number} has unbalanced quotes; fix the profile") from None
        # As the shell would: the environment and earlier assignments of the file are visible.
        values[name] = _VAR.sub(lambda m: values.get(m[1] or m[2], os.environ.get(m[1] or m[2], "")), " ".join(words))
    prof = Profile(name=path.stem)
    special = {"SBATCH_PARTITION", "SBATCH_ACCOUNT", "SBATCH_QOS", "SBATCH_GPUS_PER_NODE",
               "MEGATRON_ELASTIC_CPUS_PER_TASK",
               "SBATCH_CONSTRAINT", "MEGATRON_ELASTIC_SRUN_ARGS", "MEGATRON_ELASTIC_PYTHON", "SBATCH_MEM_PER_NODE",
               "MEGATRON_ELASTIC_EXCLUSIVE", "MEGATRON_ELASTIC_CONTAINER_IMAGE", "MEGATRON_ELASTIC_CONTAINER_MOUNTS"}  # fmt: skip
    prof.partition = values.get("SBATCH_PARTITION") or None
    prof.account = values.get("SBATCH_ACCOUNT") or None
    prof.qos = values.get("SBATCH_QOS") or None
    prof.constraint = values.get("SBATCH_CONSTRAINT") or None
    if values.get("SBATCH_GPUS_PER_NODE"):
        prof.gpus_per_node = _int(values["SBATCH_GPUS_PER_NODE"], "SBATCH_GPUS_PER_NODE", path)
    if values.get("MEGATRON_ELASTIC_CPUS_PER_TASK"):  # sbatch itself reads no variable for --cpus-per-task
        prof.cpus_per_task = _int(values["MEGATRON_ELASTIC_CPUS_PER_TASK"], "MEGATRON_ELASTIC_CPUS_PER_TASK", path)
    if values.get("SBATCH_MEM_PER_NODE"):
        mem = values["SBATCH_MEM_PER_NODE"]
        if not re.fullmatch(r"\d+[KMGT]?", mem):
            raise UserError(f"SBATCH_MEM_PER_NODE={mem!r} in profile {str(path)!r} is not a Slurm size; write e.g. "
                            "0 (all of the node), 500G or 2000000M")  # fmt: skip
        prof.mem = mem
    exclusive = values.get("MEGATRON_ELASTIC_EXCLUSIVE", "1")
    if exclusive not in ("0", "1"):
        raise UserError(f"MEGATRON_ELASTIC_EXCLUSIVE={exclusive!r} in profile {str(path)!r} must be 0 or 1; "
                        "fix the profile")
    prof.exclusive = exclusive == "1"
    prof.container_image = values.get("MEGATRON_ELASTIC_CONTAINER_IMAGE") or None
    prof.container_mounts = [m for m in values.get("MEGATRON_ELASTIC_CONTAINER_MOUNTS", "").split(",") if m]
    prof.srun_args = shlex.split(values.get("MEGATRON_ELASTIC_SRUN_ARGS", ""))
    prof.python = values.get("MEGATRON_ELASTIC_PYTHON") or None
    prof.env = {k: v for k, v in values.items() if k not in special and not k.startswith("SBATCH_")}
    return prof
