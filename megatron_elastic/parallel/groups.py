"""Process groups for tensor x pipeline x data parallelism, made by megatron-core's ``parallel_state``.

:func:`init_parallel` joins the ``env://`` rendezvous (torchrun's variables, or Slurm's translated by
the launcher first: ``launch/train.py`` calls ``slurm.env.torch_env_from_slurm``), asks megatron-core
for its groups and returns them in one :class:`ParallelGroups` that the trainer passes on explicitly:
no layer, loss or schedule of ours reads megatron's globals.

Rank layout is megatron-core's default order ``tp-cp-ep-dp-pp``: ranks of one tensor-parallel group
are adjacent, then data-parallel replicas, then pipeline stages::

    global_rank = tp_rank + tp * (dp_rank + dp * pp_rank)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_elastic.config.schema import ParallelConfig
from megatron_elastic.errors import ConfigError


@dataclass(frozen=True)
class ParallelGroups:
    """One process's view of the layout. Groups are ``None`` in a single process (nothing to talk to)."""

    tp: dist.ProcessGroup | None
    pp: dist.ProcessGroup | None
    dp: dist.ProcessGroup | None
    embedding: dist.ProcessGroup | None
    """First and last pipeline stage (tied embeddings); None without pipeline parallelism."""
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that writes metrics and talks to trackers: the first rank of the last stage
        (the only stage that sees losses)."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size}, pp {self.pp_rank}/{self.pp_size}, "
                f"dp {self.dp_rank}/{self.dp_size}, {self.device}")  # fmt: skip


def single_process(device: torch.device | str = "cpu") -> ParallelGroups:
    return ParallelGroups(tp=None, pp=None, dp=None, embedding=None, device=torch.device(device))


def resolve_backend(cfg: ParallelConfig, device: torch.device) -> str:
    if cfg.backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend=nccl needs CUDA devices; use parallel.backend=gloo (or auto) on CPU")
    return cfg.backend


def env_world_size(environ=None) -> int:
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1"))


def init_parallel(cfg: ParallelConfig, device: torch.device, *, timeout_minutes: int = 30,
                  need_group: bool = False) -> ParallelGroups:  # fmt: skip
    """Join the env:// rendezvous (if not joined yet) and build megatron-core's TP/PP/DP groups.

    A world of one process without a rendezvous is a plain single-process run (no groups), unless
    FP8 or ``need_group`` (megatron-core's DDP and optimizer: bfloat16 weights, the distributed
    optimizer) asks for a one-process group. The
    rendezvous variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) come from the launcher: under
    Slurm without torchrun the caller derives them first (launch/train.py, before anything else)."""
    world = env_world_size()
    dp = cfg.resolve_dp(world)  # ConfigError before any rendezvous when the layout does not tile
    if world == 1 and not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
        if not (cfg.fp8.enabled or need_group):
            return single_process(device)
        # FP8 layers are built by apply_tensor_parallel, megatron-core's DDP over a data-parallel
        # group: both need a (one-process) group.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(resolve_backend(cfg, device), init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_minutes))  # fmt: skip
    return build_groups(cfg.tp, cfg.pp, device=device, expected_dp=dp, timeout_minutes=timeout_minutes)


def build_groups(tp: int, pp: int, *, device: torch.device, expected_dp: int | None = None,
                 timeout_minutes: int = 30) -> ParallelGroups:  # fmt: skip
    """megatron-core's groups for an already initialised default process group."""
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    if not ps.model_parallel_is_initialized():
        # Gloo side groups are only needed by megatron's NCCL-based distributed optimizer; on CPU
        # the default groups already are gloo.
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     distributed_timeout_minutes=timeout_minutes,
                                     create_gloo_process_groups=device.type == "cuda")  # fmt: skip
    groups = ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        embedding=ps.get_embedding_group(check_initialized=False) if pp > 1 else None,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        rank=dist.get_rank(),
        world_size=world,
        device=device,
    )
    assert groups.tp_size * groups.pp_size * groups.dp_size == world, groups
    assert expected_dp is None or groups.dp_size == expected_dp, (groups, expected_dp)
    return groups


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the default group (safe to call when none exist)."""
    try:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()
