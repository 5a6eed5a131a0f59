"""Shared by the parallel-layout tests: build a tiny plain or elastic run, train it in one process
(the reference trainers) or on a TP x PP x DP layout (the parallel trainers, in spawned gloo
workers), and compare metric traces."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from spawning import spawn_ranks

# fp32 throughout. PP runs the very same ops; TP changes the order of reductions (all-reduced
# partial matmuls, vocabulary-parallel softmax sums); router gradients are sums over stages / shards
# in another order. The traces agree to this "state tolerance".
RTOL, ATOL = 1e-4, 1e-5
STEPS, SAVE_AT = 5, 3
PLAIN = ["data.builtin_max_mb=0.5", "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.warmup_steps=2", "train.log_interval=1", "train.eval_batches=1", "train.eval_interval=0",
         f"train.max_steps={STEPS}", f"train.save_interval={SAVE_AT}", "train.keep_last=5"]  # fmt: skip
# Two settings keep the elastic comparison well conditioned. At step 1 the student *is* the teacher,
# so the full budget's KD gradient is zero up to rounding, and Adam's first steps turn any gradient
# into an update of ~lr * sign(g): with KD alone, weights that only the full budget touches would
# move by sign-random steps that depend on the reduction order of the layout. A CE term
# (distill.ce_weight=1) gives them a real gradient. Likewise the router's learning rate stays at
# train.lr (multiplier 1 instead of the recipe's 100) so rounding-level router gradients cannot move
# its logits by 0.03 per step.
ELASTIC = ["data.builtin_max_mb=0.5", "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
           "train.warmup_steps=2", "train.log_interval=1", "train.eval_batches=1", "train.eval_interval=0",
           "train.max_steps=3", "train.save_interval=0", "elastic.router_warmup_steps=100",
           "elastic.router_lr_multiplier=1", "distill.ce_weight=1.0"]  # fmt: skip
DEPTH_ORDER = [3, 1, 6, 4, 2, 5, 0]


def make_parent(root: Path) -> None:
    from reference import randomize_

    from megatron_elastic.convert import save_native
    from megatron_elastic.model import HybridLM, preset

    torch.manual_seed(0)
    save_native(randomize_(HybridLM(preset("tiny")), seed=0), root / "importance" / "parent")
    (root / "importance" / "ranking.json").write_text(json.dumps({"depth": {"method": "given", "order": DEPTH_ORDER}}))


def config(kind: str, root: Path, run_dir: Path, overrides: tuple = ()):
    from megatron_elastic.config import load_config
    from megatron_elastic.training.run import resolve_elastic_run

    if kind == "plain":
        return load_config("tiny", [*PLAIN, f"run_dir={run_dir}", f"data.cache_dir={root / 'cache'}", *overrides]), None
    cfg = load_config("elastic-tiny", [*ELASTIC, f"run_dir={run_dir}", f"data.cache_dir={root / 'cache'}",
                                       f"elastic.parent={root / 'importance' / 'parent'}", *overrides])  # fmt: skip
    run = resolve_elastic_run(cfg)
    return run.cfg, run.depth_order


def train(kind: str, root: Path, run_dir: Path, groups=None, overrides: tuple = ()) -> int:
    """Train run ``run_dir`` to the end: the single-process trainers when ``groups`` is None. A parallel
    elastic run leaves ``probe-rank<r>.json`` per rank: the most teacher logits alive at once and what
    the many-in-one export held (the trainer's own counts)."""
    from megatron_elastic.api import load_pretrained
    from megatron_elastic.training.data_setup import build_training_data

    cfg, order = config(kind, root, run_dir, overrides)
    dp_rank, dp_size = (groups.dp_rank, groups.dp_size) if groups else (0, 1)
    data = build_training_data(cfg, dp_rank=dp_rank, dp_world_size=dp_size, log=lambda m: None)
    if groups is None:
        from megatron_elastic.training.elastic_trainer import ElasticTrainer
        from megatron_elastic.training.trainer import Trainer

        if kind == "plain":
            return Trainer(cfg, data).fit().exit_code
        parent = load_pretrained(cfg.elastic.parent).train()
        return ElasticTrainer(cfg, data, depth_order=order, parent=parent).fit().exit_code
    from megatron_elastic.parallel.trainer import ParallelElasticTrainer, ParallelTrainer

    if kind == "plain":
        return ParallelTrainer(cfg, data, groups=groups).fit().exit_code
    trainer = ParallelElasticTrainer(cfg, data, depth_order=order, parent=cfg.elastic.parent, groups=groups)
    code = trainer.fit().exit_code
    stats = getattr(trainer, "export_stats", None)
    export = None if stats is None else {k: getattr(stats, k) for k in ("peak_bytes", "largest_tensor_bytes", "tensors",
                                                                        "held_bytes")}  # fmt: skip
    probe = {"teacher_logits_peak": trainer.teacher_logits_peak, "is_logging_rank": groups.is_logging_rank,
             "export": export}  # fmt: skip
    (run_dir / f"probe-rank{groups.rank}.json").write_text(json.dumps(probe))
    return code


def _worker(rank: int, port: int, world: int, tp: int, pp: int, root: str, runs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import mcore_cpu_shim

    from megatron_elastic.parallel.groups import build_groups, destroy_parallel

    mcore_cpu_shim.install()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = build_groups(tp, pp, device=torch.device("cpu"))
        assert (groups.tp_size, groups.pp_size) == (tp, pp)
        for kind, run_dir, *overrides in runs:
            if kind.startswith("resume:"):  # an earlier run of this layout as it was after SAVE_AT, resumed
                if rank == 0:
                    resume_copy(Path(root) / kind.split(":", 1)[1], Path(root) / run_dir, SAVE_AT)
                dist.barrier()
                kind = "plain"
            assert train(kind, Path(root), Path(root) / run_dir, groups, tuple(*overrides)) == 0, run_dir
    finally:
        destroy_parallel()


def train_one_rank(kind: str, root: Path, run_dir: Path, overrides: tuple = ()) -> int:
    """The parallel trainers in this process as a one-rank layout (a one-process gloo group: DP=1)."""
    import mcore_cpu_shim

    from megatron_elastic.parallel.groups import build_groups, destroy_parallel

    mcore_cpu_shim.install()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return train(kind, root, run_dir, build_groups(1, 1, device=torch.device("cpu")), overrides)
    finally:
        destroy_parallel()


def spawn_layout(root: Path, *, tp: int, pp: int, runs: list, dp: int = 1, timeout: float = 300) -> None:
    """Train ``runs`` ([(kind, run_dir name[, config overrides])]) on a tp x pp x dp layout of real gloo
    processes; assert every exit code is 0. Kind ``resume:NAME`` resumes a plain run NAME of the same
    spawn from its checkpoint of SAVE_AT."""
    world = tp * pp * dp
    spawn_ranks(_worker, world, tp, pp, str(root), runs, world=world, timeout=timeout)


def resume_copy(src: Path, dst: Path, step: int) -> Path:
    """``src`` as it was right after its checkpoint of ``step``."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return dst


def trace(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def assert_same_trace(got: list[dict], want: list[dict], rtol: float = RTOL, atol: float = ATOL) -> None:
    assert [g["step"] for g in got] == [w["step"] for w in want]
    for g, w in zip(got, want):
        assert set(g) == set(w), g["step"]  # the same metrics: the same budgets were drawn
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=atol), (g["step"], key, g[key], w[key])


def reference_runs(root: Path) -> Path:
    """The single-process plain and elastic runs the layouts are compared with."""
    make_parent(root)
    assert train("plain", root, root / "single") == 0
    assert train("elastic", root, root / "elastic_single") == 0
    return root


def assert_same_parent(root: Path, run: str) -> None:
    """The many-in-one parent of ``run`` (gathered from its shards) against the single process's."""
    from safetensors.torch import load_file

    # A gather bug would misplace whole rows; Adam moves an element by at most ~lr per step whatever
    # its gradient, so an element whose gradient is rounding-level (measured: 1 of 65,536 embedding
    # entries) may differ by up to 2 x sum(lr) while the tensors agree to ~3e-6 in norm.
    want = load_file(root / "elastic_single" / "many-in-one" / "model.safetensors")
    got = load_file(root / run / "many-in-one" / "model.safetensors")
    assert got.keys() == want.keys()
    moved = 2 * sum(r["lr"] for r in trace(root / "elastic_single")) * 1.01
    for key, value in want.items():
        diff = got[key] - value
        assert float(diff.norm() / value.norm()) < RTOL, key
        assert float(diff.abs().max()) <= moved, key


def probes(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("probe-rank*.json"))]


def assert_streamed_export(run_dir: Path) -> None:
    """The many-in-one parent a sharded run streamed to its logging rank equals, byte for byte, the
    single-process export (``save_native``) of the same weights: its last checkpoint (written by every
    rank, nothing gathered) read into one single-device model. Every rank's export held at most
    2 full tensors' worth of buffers (the writer: TP pieces + the assembled tensor), by its own count."""
    from megatron_elastic.checkpoint.dist import load_checkpoint
    from megatron_elastic.config import TrainConfig
    from megatron_elastic.convert.native import read_native_config, save_native
    from megatron_elastic.model import HybridLM
    from megatron_elastic.training.trainer import build_optimizer

    exported = run_dir / "many-in-one"
    root = run_dir / "checkpoints"
    model = HybridLM(read_native_config(exported), init=False)
    last = root / (root / "latest").read_text().strip()
    load_checkpoint(last, model=model, optimizer=build_optimizer(model, TrainConfig()))
    save_native(model, run_dir.parent / f"{run_dir.name}_single_export")
    got = (exported / "model.safetensors").read_bytes()
    assert got == (run_dir.parent / f"{run_dir.name}_single_export" / "model.safetensors").read_bytes()
    ranks = probes(run_dir)
    writer = [p["export"] for p in ranks if p["is_logging_rank"]]
    assert len(writer) == 1 and writer[0]["tensors"] == len(model.state_dict())
    for p in ranks:
        e = p["export"]
        assert e["held_bytes"] == 0 and e["peak_bytes"] <= 2 * e["largest_tensor_bytes"], e
    assert writer[0]["peak_bytes"] >= writer[0]["largest_tensor_bytes"] // 2  # it really assembled or received tensors
