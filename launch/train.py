"""Parallel training entry point for torchrun, srun or any launcher that sets env:// variables.

    torchrun --nproc-per-node 4 launch/train.py --config tiny parallel.tp=2 parallel.pp=2 run_dir=runs/x
    srun -n 2 python launch/train.py --config elastic-tiny elastic.parent=... parallel.tp=1

Takes the same recipes and ``section.key=value`` overrides as ``megatron-elastic train``; the
``parallel`` section gives the layout (dp is derived from the world size). Under Slurm without
torchrun, RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are derived from SLURM_* first. A plain
``python launch/train.py`` (no rendezvous variables) trains in one process.

Exit codes: 0 done, 2 a user error (one line on stderr, before any compute), 75 stopped by
SIGTERM / SIGUSR1 after a checkpoint (requeue and run again to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML recipe (path or name in configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_elastic.errors import UserError
    from megatron_elastic.slurm.env import torch_env_from_slurm

    from megatron_elastic.training.signals import EXIT_REQUEUE, StopRequested, stop_during_setup

    stop_during_setup()  # a preemption during start-up is a requeue too, not a crash
    try:
        args = parse_args(argv)
        torch_env_from_slurm()
        return run(args)
    except UserError as exc:
        print(f"launch/train.py: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    except StopRequested as stop:
        print(f"[train] signal {stop.signum} during start-up, before the first step: nothing to save; exiting "
              f"with code {EXIT_REQUEUE} (the requeued job starts again)", flush=True)  # fmt: skip
        return EXIT_REQUEUE


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from megatron_elastic.config import load_config
    from megatron_elastic.errors import ConfigError
    from megatron_elastic.parallel.groups import destroy_parallel, env_world_size, init_parallel
    from megatron_elastic.training.data_setup import build_training_data
    from megatron_elastic.training.run import check_resume, resolve_elastic_run
    from megatron_elastic.training.trainer import resolve_device, resolve_params_dtype
    from megatron_elastic.utils.io import check_writable

    cfg = load_config(args.config, args.overrides)
    run = resolve_elastic_run(cfg) if cfg.elastic is not None else None
    if run is not None:
        cfg = run.cfg
    device = resolve_device(cfg.train.device)
    check_writable(cfg.run_dir, "run_dir")  # before any rendezvous, data or model
    p = cfg.parallel
    p.resolve_dp(env_world_size())  # the layout must tile the world before anyone waits on a rendezvous
    if p.pp > 1 and device.type != "cuda":
        raise ConfigError("parallel.pp > 1 needs CUDA devices: megatron-core's pipeline schedule allocates its "
                          "communication buffers on CUDA; use parallel.pp=1 on CPU")  # fmt: skip
    if p.fp8.enabled and device.type != "cuda":
        raise ConfigError("parallel.fp8.enabled=true needs CUDA devices (Transformer Engine); turn it off on CPU")
    megatron_optimizer = p.distributed_optimizer or resolve_params_dtype(cfg.train.params_dtype, device) != torch.float32
    if megatron_optimizer and device.type != "cuda":
        raise ConfigError("train.params_dtype=bfloat16 and parallel.distributed_optimizer=true need CUDA devices: "
                          "megatron-core's DDP and optimizers allocate their buffers on CUDA; use "
                          "train.params_dtype=float32 (or auto) and parallel.distributed_optimizer=false on CPU")  # fmt: skip
    check_resume(cfg)  # a run to resume: checked before any rendezvous or data
    groups = init_parallel(p, device, need_group=megatron_optimizer)
    try:
        if groups.rank == 0:
            print(f"[parallel] tp={groups.tp_size} pp={groups.pp_size} dp={groups.dp_size} "
                  f"world={groups.world_size} backend={dist.get_backend() if groups.distributed else 'none'}", flush=True)  # fmt: skip
        # Rank 0 tokenizes the built-in corpus into the shared cache once; the others then read it.
        if groups.rank == 0:
            data = build_training_data(cfg, dp_rank=groups.dp_rank, dp_world_size=groups.dp_size)
        if groups.distributed:
            dist.barrier()
        if groups.rank != 0:
            data = build_training_data(cfg, dp_rank=groups.dp_rank, dp_world_size=groups.dp_size, log=lambda m: None)
        if run is not None:
            from megatron_elastic.parallel.trainer import ParallelElasticTrainer

            # every rank reads only its own part of the parent's files
            trainer = ParallelElasticTrainer(cfg, data, depth_order=run.depth_order, parent=run.parent, groups=groups)
        else:
            from megatron_elastic.parallel.trainer import ParallelTrainer

            trainer = ParallelTrainer(cfg, data, groups=groups)
        result = trainer.fit()
        if groups.is_logging_rank and result.exit_code == 0 and result.val_loss is not None:
            print(f"[train] final validation loss {result.val_loss:.4f} nats/token", flush=True)
        return result.exit_code
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
