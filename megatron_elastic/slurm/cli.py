"""``megatron-elastic launch slurm``: check a training request against the cluster, submit it through
submitit, print the job id and log paths, follow rank 0's log through requeues to the end."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from megatron_elastic.errors import UserError


def register(subparsers) -> None:
    launch = subparsers.add_parser("launch", help="run training on a cluster (Slurm)")
    launch_sub = launch.add_subparsers(dest="launcher", metavar="LAUNCHER")
    p = launch_sub.add_parser(
        "slurm", help="submit training (plain or elastic) to Slurm through submitit and follow it",
        description="Submit `launch/train.py` with one task per GPU; SIGUSR1 before the time limit makes the "
                    "job checkpoint and requeue itself, and the requeued job resumes. See docs/slurm.md.",
    )  # fmt: skip
    p.add_argument("--config", required=True, help="YAML recipe (path or name in configs/)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, one task each (default: the profile's, else 0 = CPU tasks)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default: the profile's, else 1)")
    p.add_argument("--time", default="60", help="time limit, Slurm format: 30, 4:00:00, 1-00:00:00 (default 60 min)")
    p.add_argument("--partition", default=None, help="partition (default: the profile's, else the cluster's default)")
    p.add_argument("--account", default=None, help="account to charge (default: the profile's)")
    p.add_argument("--qos", default=None, help="quality of service (default: the profile's)")
    p.add_argument("--profile", default=None,
                   help="cluster profile: a name in slurm/profiles (e.g. h100, h100-pyxis) or an .env file")
    p.add_argument("--job-name", default="megatron-elastic", help="Slurm job name")
    p.add_argument("--signal-before", type=int, default=None, metavar="S",
                   help="send SIGUSR1 S seconds before the time limit: checkpoint and requeue (default: the plan's "
                        "2 checkpoint saves + 1 step, at least 120; a smaller value is refused)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU for the plan (default 80GB)")
    p.add_argument("--fs-bandwidth", type=float, default=None, metavar="GB/S",
                   help="aggregate checkpoint write bandwidth the plan assumes (default: plan's)")
    p.add_argument("--max-requeues", type=int, default=20, help="stop requeueing after this many restarts (default 20)")
    p.add_argument("--folder", default=None, help="submitit folder for scripts and logs (default RUN_DIR/slurm)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and the batch script and exit; submit nothing (missing inputs only warn)")
    p.add_argument("--no-follow", action="store_true", help="print the job id and log paths, then return")
    p.add_argument("--poll", type=float, default=10.0, metavar="S",
                   help="seconds between accounting queries (default 10)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. parallel.tp=2")
    p.set_defaults(func=cmd_launch_slurm)
    launch.set_defaults(func=lambda a: launch.print_help() or 2)


def build_request(args):
    """Every check that needs no cluster: profile, config, layout, time; the LaunchRequest."""
    from megatron_elastic.config import load_config
    from megatron_elastic.config.loader import resolve_recipe
    from megatron_elastic.slurm import submit
    from megatron_elastic.slurm.profiles import Profile, load_profile

    prof = load_profile(args.profile) if args.profile else Profile(name="none")
    for flag in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_before", "max_requeues"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag in ("nodes", "tasks_per_node", "cpus_per_task") else 0):
            raise UserError(f"--{flag.replace('_', '-')} {value} is out of range; give a positive number")
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (prof.gpus_per_node or 0)
    tasks = args.tasks_per_node if args.tasks_per_node is not None else (gpus or 1)
    if gpus and tasks != gpus:
        raise UserError(f"--tasks-per-node {tasks} differs from --gpus-per-node {gpus}; training runs one task per GPU")
    cfg = load_config(args.config, args.overrides)  # a missing or bad recipe fails here, before anything else
    cfg.parallel.resolve_dp(args.nodes * tasks)  # the TP x PP layout must tile the world
    if not submit.TRAIN_ENTRY.is_file():
        raise UserError(f"training entry {submit.TRAIN_ENTRY} is missing; run from a full checkout of megatron-elastic")
    run_dir = Path(cfg.run_dir).resolve()
    return submit.LaunchRequest(
        config=str(resolve_recipe(args.config).resolve()),
        overrides=list(args.overrides),
        run_dir=run_dir,
        nodes=args.nodes,
        gpus_per_node=gpus,
        tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task or prof.cpus_per_task or 1,
        time_min=submit.parse_time(args.time),
        partition=args.partition or prof.partition,
        account=args.account or prof.account,
        qos=args.qos or prof.qos,
        constraint=prof.constraint,
        job_name=args.job_name,
        signal_s=args.signal_before if args.signal_before is not None else submit.DEFAULT_SIGNAL_S,
        max_requeues=args.max_requeues,
        srun_args=prof.srun_args,
        mem=prof.mem,
        exclusive=prof.exclusive,
        container_image=prof.container_image,
        container_mounts=submit.container_mounts(cfg, run_dir, prof.container_mounts) if prof.container_image else [],
        env=prof.env,
        python=prof.python or sys.executable,
        folder=Path(args.folder).resolve() if args.folder else None,
        missing_inputs=missing_inputs(cfg),
        run_config=cfg,
    )


def plan_request(req, args) -> None:
    """A GPU job must fit, and its stop signal must leave time to save: the plan (``megatron-elastic
    plan``) of the request, kept in ``req.plan``; the signal lead defaults to the plan's (at least 120 s)."""
    from megatron_elastic.parallel.plan import DEFAULT_FS_GBPS, make_plan, parse_size
    from megatron_elastic.slurm.submit import DEFAULT_SIGNAL_S

    if not req.gpus_per_node:
        return
    plan = make_plan(req.run_config, nodes=req.nodes, gpus_per_node=req.gpus_per_node,
                     gpu_memory=parse_size(args.gpu_memory), fs_gbps=args.fs_bandwidth or DEFAULT_FS_GBPS)  # fmt: skip
    if not plan.fits:
        raise UserError(f"the job does not fit: {plan.verdict()}")
    if args.signal_before is None:
        req.signal_s = max(DEFAULT_SIGNAL_S, plan.signal_s)
    elif args.signal_before < plan.signal_s:
        raise UserError(f"--signal-before {args.signal_before} leaves too little time to checkpoint: the plan needs "
                        f"{plan.signal_s} s (2 saves of {plan.save_s:.0f} s + one step); give at least that")  # fmt: skip
    req.plan = plan


def missing_inputs(cfg) -> list[str]:
    """The recipe's inputs (``submit.recipe_inputs``) that are not on this machine."""
    from megatron_elastic.data.indexed import dataset_files
    from megatron_elastic.slurm.submit import recipe_inputs

    missing = []
    for key, path, kind in recipe_inputs(cfg):
        if kind == "prefix" and not all(p.exists() for p in dataset_files(path)[:2]):
            missing.append(f"{key} {path} (.bin/.idx)")
        elif kind != "prefix" and not Path(path).exists():
            missing.append(f"{key} {path}")
    return missing


def cmd_launch_slurm(args) -> int:
    import shutil

    from megatron_elastic.slurm import cluster, submit

    req = build_request(args)
    if args.dry_run and shutil.which("sinfo") is None:
        print("[launch] sinfo not found: the request was not checked against a cluster", file=sys.stderr)
    else:
        part = cluster.check_request(req.partition, nodes=req.nodes, gpus_per_node=req.gpus_per_node,
                                     tasks_per_node=req.tasks_per_node, cpus_per_task=req.cpus_per_task)  # fmt: skip
        req.partition = req.partition or part.name
    plan_request(req, args)
    if not args.profile:  # after every check: an error stays the one line on stderr
        print("[launch] warning: no --profile named: partition, CPUs per task (1), NCCL and container settings are "
              "the cluster's defaults; see slurm/profiles/ and docs/slurm.md", file=sys.stderr)  # fmt: skip
    if req.missing_inputs:
        what = "; ".join(req.missing_inputs)
        if not args.dry_run:
            raise UserError(f"inputs missing on this machine: {what}; create them (or fix the paths) before submitting")
        print(f"[launch] warning: inputs missing on this machine: {what}", file=sys.stderr)
    if args.dry_run:
        if req.plan is not None:
            from megatron_elastic.parallel.plan import format_plan

            print(format_plan(req.plan), file=sys.stderr)  # stdout stays the batch script alone
        print(submit.batch_script(req))
        return 0
    t0 = time.time()
    job = submit.submit(req)
    stdout, stderr = submit.log_paths(job)
    print(f"[launch] submitted job {job.job_id}: {req.nodes} node(s) x {req.tasks_per_node} task(s)"
          f"{' x 1 GPU' if req.gpus_per_node else ''}, partition {req.partition}, time limit {req.time_min} min, "
          f"SIGUSR1 {req.signal_s} s before it", flush=True)  # fmt: skip
    print(f"[launch] logs: {stdout} (rank 0), {stderr}; every rank: {stdout.parent}/{job.job_id}_*_log.*", flush=True)
    print(f"[launch] run directory {req.run_dir}", flush=True)
    if args.no_follow:
        print(f"[launch] follow with: tail -f {stdout}; cancel with: scancel {job.job_id}")
        return 0
    try:
        outcome = submit.follow(job, poll_s=args.poll)
    except KeyboardInterrupt:
        print(f"\n[launch] stopped following; job {job.job_id} keeps running (scancel {job.job_id} to stop it)",
              file=sys.stderr)  # fmt: skip
        return 130
    took = time.time() - t0
    requeued = f", requeued {outcome.requeues}x" if outcome.requeues else ""
    if outcome.exit_code == 0:
        print(f"[launch] job {job.job_id} {outcome.state} {took:.1f} s after submission{requeued}; "
              f"{submit.summary(req.run_dir)}", flush=True)  # fmt: skip
        return 0
    print(f"megatron-elastic: error: job {job.job_id} {outcome.state}{requeued}: {outcome.message} "
          f"(logs: {stdout.parent}/{job.job_id}_*_log.err)", file=sys.stderr, flush=True)  # fmt: skip
    return 1
