"""Run setup as library functions: what ``megatron-elastic train`` / ``importance``, ``launch/train.py``,
the study and the demo do, with typed arguments.

* :func:`resolve_elastic_run` -- an elastic recipe against its parent: the parent's config replaces the
  model section, the depth order comes from the importance ranking, the space is built and checked
  (budgets reachable, a checkpoint to resume trained with the same space), all before any data or compute;
* :func:`check_resume` -- the latest checkpoint of the run directory, validated against the model;
* :func:`run_training` -- a whole single-process run: checks, data, the plain or the elastic trainer, fit;
* :func:`rank_and_permute` -- importance ranking on calibration data and the permuted parent, written
  atomically (``OUT/parent``, ``OUT/ranking.json``, ``OUT/importance.md``).

Every error a user can cause is a :class:`~megatron_elastic.errors.UserError` raised before any compute.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_elastic.config import RunConfig, load_config
from megatron_elastic.errors import UserError

DEFAULT_RECIPE = "tiny"


def _say(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True, kw_only=True)
class ElasticRun:
    """An elastic recipe resolved against its parent."""

    cfg: RunConfig
    """The run config, its model section the parent's and ``elastic.ranking`` the ranking file found (or '')."""
    parent: Path
    """The parent model directory."""
    depth_order: list[int] | None
    """Layer removal order, least important first; None = no ranking (layers drop from the last)."""


def resolve_elastic_run(cfg: RunConfig) -> ElasticRun:
    """The parent's config replaces the recipe's model section; the depth order comes from the importance
    ranking (``elastic.ranking``, else ranking.json inside or beside the parent). All checked before any
    data or compute: the space, the budgets' reachability and a checkpoint to resume."""
    from megatron_elastic.api import read_model_config
    from megatron_elastic.checkpoint import native as checkpoint
    from megatron_elastic.elastic.costs import Cost
    from megatron_elastic.elastic.importance import find_ranking, read_depth_order
    from megatron_elastic.elastic.search_space import ElasticSpace
    from megatron_elastic.elastic.selection import check_budgets_reachable
    from megatron_elastic.training.elastic_trainer import check_same_space

    parent = Path(cfg.elastic.parent)
    model_cfg = read_model_config(parent, what="elastic.parent")
    ranking = find_ranking(parent, cfg.elastic.ranking or None, key="elastic.ranking")
    depth_order = read_depth_order(ranking) if ranking is not None else None
    elastic = dataclasses.replace(cfg.elastic, ranking=str(ranking) if ranking else "")
    cfg = dataclasses.replace(cfg, model=model_cfg, elastic=elastic)
    cfg.validate()
    # an infeasible space fails here, with one line
    space = ElasticSpace.from_config(cfg.model, cfg.elastic, depth_order)
    check_budgets_reachable(space, Cost.from_config(cfg.elastic, space), cfg.elastic.budgets,
                            tolerance=cfg.elastic.router_tolerance)  # fmt: skip
    latest = checkpoint.latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    if latest is not None:
        check_same_space(latest, space, cfg.elastic.budgets)
    return ElasticRun(cfg=cfg, parent=parent, depth_order=depth_order)


def check_resume(cfg: RunConfig) -> Path | None:
    """The run directory's latest checkpoint (None for a new run), checked against ``cfg.model`` before
    any data or model is built."""
    from megatron_elastic.checkpoint import native as checkpoint

    latest = checkpoint.latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    if latest is not None:
        checkpoint.validate_checkpoint(latest, cfg.model)
    return latest


# Bytes per parameter a single-process run holds at least: fp32 weights, gradients and the two AdamW
# moments; an elastic run also holds the frozen parent it loads and the teacher copied from it.
TRAIN_BYTES_PER_PARAM = 16
ELASTIC_EXTRA_BYTES_PER_PARAM = 8


def available_memory(device) -> int:
    """Bytes free on ``device`` (a torch.device): CUDA's free memory, or the host's available memory."""
    import os

    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_can_run(cfg: RunConfig) -> None:
    """Before any data or model of a single-process run: the device exists, the run directory can be
    written, and the parameters with their gradients and optimizer state fit in the device's memory
    (a lower bound, activations not counted: a model refused here could never have run)."""
    from megatron_elastic.model.config import num_parameters
    from megatron_elastic.training.trainer import resolve_device
    from megatron_elastic.utils.io import check_writable

    device = resolve_device(cfg.train.device)
    check_writable(cfg.run_dir, "run_dir")
    if cfg.data.cache_dir:
        check_writable(cfg.data.cache_dir, "data.cache_dir")
    params = sum(num_parameters(cfg.model).values())
    need = params * (TRAIN_BYTES_PER_PARAM + (ELASTIC_EXTRA_BYTES_PER_PARAM if cfg.elastic is not None else 0))
    free = available_memory(device)
    if need > free:
        raise UserError(f"the model has {params:,} parameters: training them needs at least {need / 2**30:,.1f} GiB "
                        f"(weights, gradients, AdamW state) but {device.type} has {free / 2**30:,.1f} GiB free; "
                        "shrink the model or train it in parallel (launch/train.py with parallel.tp / pp)")  # fmt: skip


def run_training(cfg: RunConfig):
    """Train ``cfg`` in this process (resuming its run directory) and return the
    :class:`~megatron_elastic.training.trainer.TrainResult`; an elastic section trains every budget
    of ``elastic.parent``."""
    from megatron_elastic.training.signals import EXIT_REQUEUE, StopRequested, stop_during_setup
    from megatron_elastic.training.trainer import TrainResult

    stop_during_setup()
    try:
        return _train(cfg)
    except StopRequested as stop:
        print(f"[train] signal {stop.signum} during start-up, before the first step: nothing to save; exiting "
              f"with code {EXIT_REQUEUE} (run the same command again to start)", flush=True)  # fmt: skip
        return TrainResult(EXIT_REQUEUE, 0, None, None)


def _train(cfg: RunConfig):
    from megatron_elastic.training.data_setup import build_training_data
    from megatron_elastic.training.trainer import Trainer

    run = resolve_elastic_run(cfg) if cfg.elastic is not None else None
    if run is not None:
        cfg = run.cfg
    check_can_run(cfg)
    check_resume(cfg)
    data = build_training_data(cfg)  # every input checked before the model is built
    if run is not None:
        from megatron_elastic.api import load_pretrained
        from megatron_elastic.training.elastic_trainer import ElasticTrainer

        parent = load_pretrained(run.parent).train()
        result = ElasticTrainer(cfg, data, depth_order=run.depth_order, parent=parent).fit()
    else:
        result = Trainer(cfg, data).fit()
    if result.exit_code == 0 and result.val_loss is not None:
        base = data.unigram_baseline
        print(f"[train] final validation loss {result.val_loss:.4f} nats/token"
              + (f" (unigram baseline {base:.4f})" if base is not None else ""), flush=True)  # fmt: skip
    return result


def rank_and_permute(checkpoint: str | Path, out: str | Path, *, recipe: str | Path | None = None,
                     overrides: list[str] | None = None, batches: int = 8, batch_size: int = 4,
                     seq_len: int | None = None, depth_method: str = "iterative-mse", seed: int = 0,
                     device: str = "auto", overwrite: bool = False, log=_say):  # fmt: skip
    """Rank every elastic axis of ``checkpoint`` on ``batches`` calibration micro-batches of
    ``batch_size`` x ``seq_len`` tokens (the training split of ``recipe``'s data section, default the
    tiny recipe, shuffled with ``seed``), permute it and write ``out`` atomically. Returns the
    :class:`~megatron_elastic.elastic.importance.Ranking`."""
    overrides = list(overrides or [])
    model_overrides = [o for o in overrides if o.strip().startswith("model.") or o.strip().startswith("model=")]
    if model_overrides:
        raise UserError(
            f"override {model_overrides[0]!r} is not allowed: the model comes from --checkpoint; "
            "override only data.* (and run_dir)"
        )
    out, ckpt = Path(out), Path(checkpoint)
    if out.exists() and not overwrite:
        raise UserError(f"output directory {str(out)!r} already exists; choose a new path or pass --overwrite")
    if not ckpt.exists():
        raise UserError(f"checkpoint {str(ckpt)!r} does not exist; give a native or Hugging Face model directory")

    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA device is available; use --device cpu or auto")
    overrides += [f"data.seq_len={seq_len}"] if seq_len is not None else []
    base = load_config(recipe or DEFAULT_RECIPE, overrides)

    from megatron_elastic.api import load_pretrained

    start = time.perf_counter()
    model = load_pretrained(ckpt, dtype=None)  # the stored dtype: a permutation is exact in any dtype
    cfg = dataclasses.replace(
        base,
        model=model.config,
        train=dataclasses.replace(base.train, micro_batch_size=batch_size, global_batch_size=batch_size, seed=seed),
    )
    cfg.validate()  # e.g. the tokenizer's vocabulary must fit the checkpoint's
    c = model.config
    dtype = next(model.parameters()).dtype
    log(f"[importance] checkpoint {ckpt}: pattern {''.join(c.layer_types)} ({c.num_layers} layers), "
        f"hidden {c.hidden_size}, {model.num_parameters():,} parameters, {dtype}")  # fmt: skip

    from megatron_elastic.data.loader import PackedLoader
    from megatron_elastic.training.data_setup import build_training_data

    data = build_training_data(cfg)
    loader = PackedLoader(data.train_dataset, micro_batch_size=batch_size, seed=seed)
    calib = [tokens for tokens, _ in itertools.islice(loader, batches)]
    log(f"[importance] calibration: {len(calib)} batches x {batch_size} x {cfg.data.seq_len} tokens "
        f"from {cfg.data.train_prefix!r} (seed {seed})")  # fmt: skip

    target = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    model.to(target)

    from megatron_elastic.elastic.importance import compute_ranking
    from megatron_elastic.elastic.permute import permute_

    ranking = compute_ranking(model, calib, depth_method=depth_method, seed=seed, log=log)
    ranking.meta["checkpoint"] = str(ckpt)
    probe = calib[0].to(target)
    with torch.no_grad():
        before = model(probe)
        permute_(model, ranking)
        after = model(probe)
    diff = (after - before).abs().max().item()
    scale = before.abs().max().item()
    log(f"[importance] permuted parent vs original on calibration batch 1: max |logit diff| = {diff:.2e} "
        f"(max |logit| {scale:.3g})")  # fmt: skip

    from megatron_elastic.convert.native import save_native
    from megatron_elastic.utils.io import atomic_directory, write_json

    model.cpu()
    report = ranking.report(model.config)
    report += (f"\n## Permutation check\n\nPermuted parent vs original on calibration batch 1: max |logit diff| = "
               f"{diff:.3e} (max |logit| {scale:.4g}).\n")  # fmt: skip
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_native(model, tmp / "parent", side_files_from=ckpt)
        write_json(tmp / "ranking.json", ranking.to_dict())
        (tmp / "importance.md").write_text(report)
    depth = ", ".join(str(i) for i in ranking.depth)
    log(f"[importance] depth removal order ({ranking.depth_method}, least important first): {depth}")
    log(f"[importance] wrote {out}/parent (permuted parent), {out}/ranking.json, {out}/importance.md "
        f"in {time.perf_counter() - start:.0f}s")  # fmt: skip
    return ranking
