"""Checkpoints of a parallel run through megatron-core ``dist_checkpointing``; any layout resumes any other.

With a sharded model (TP > 1 or PP > 1) every rank writes its own pieces as megatron-core
``ShardedTensor``s (``torch_dist`` format). With data parallelism only, every rank holds exactly
the single-process model and optimizer, and the logging rank writes the single-process format of
:mod:`megatron_elastic.checkpoint.native` (a native model directory). In the sharded format:

* keys are layout-independent: the global component keys of ``model.layout.component_layout``
  (``layers.5.mixer.in_proj.weight.z``, ...; global layer indices, so the stage split does not show);
  AdamW's moments under ``optim.exp_avg.<key>`` / ``optim.exp_avg_sq.<key>``, its step count per
  parameter under ``optim.step.<name>``, the router's moments by index under ``optim.*.router.<i>``;
* a TP-sharded component is ``from_rank_offsets(key, piece, (axis, tp_rank, tp))`` with
  ``replica_id = dp_rank``; replicated tensors take ``replica_id = tp_rank * dp + dp_rank`` (the
  router: the global rank), so each element is written once, by replica 0;
* each rank's RNG state is a ``ShardedObject`` (``rng``, one per global rank): a resume at the same
  layout restores every rank's own generators; another layout takes the logging rank's;
* the small files (``trainer_state.json`` with the loader position, ``config.yaml``,
  ``megatron_elastic.json``, the elastic ``router.pt`` / ``elastic.json``) are written by the logging
  rank as in the single-process format.

With megatron-core's optimizer (bfloat16 weights or the distributed optimizer, ``parallel.optimizer``)
the sharded format is written at any layout: the model's tensors as above, the router's AdamW as above,
and megatron-core's own optimizer state from its ``sharded_state_dict`` (fp32 main weights and Adam
moments). The distributed optimizer uses megatron-core's ``dp_reshardable`` format (``fully_sharded_model_space``
is refused by megatron-core 0.16: flattened ranges): each rank writes the buckets it owns, so a DP=2
checkpoint resumes at DP=1 and back at the same TP x PP; the mixed-precision optimizer writes
``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.param.<name>`` per parameter (replica 0 only; under
TP ``param.tp<T>.<name>``, the ranks' shards stacked). That optimizer state is read back at the same
TP x PP only (a one-line error otherwise).

Atomic: everything goes to ``.step_XXXXXXXX.tmp-dist`` next to the final directory; after a barrier
rank 0 renames it, moves ``latest`` and prunes (``checkpoint.native.publish``). Loading reads a
dist checkpoint with a sharded state dict of the current layout (resharding is megatron-core's), or
a single-process checkpoint by cutting the full tensors (``_Slicer``). The single-process trainer
reads either format through :func:`load_checkpoint` (a dist checkpoint in a one-rank gloo group).

Saving uses ``SyncTorchDistSave`` (``_sync_save_strategy``): megatron-core 0.16's own ``torch_dist`` save strategy
always goes through its asynchronous writer, whose synchronous path calls
``torch.cuda.synchronize()`` (``FileSystemWriterAsync.preload_tensors``) and broadcasts a
``device=torch.cuda.current_device()`` tensor (``save_state_dict_async_finalize``); both fail in a
CPU-only build. The subclass writes the same format with ``torch.distributed.checkpoint.save``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_elastic.errors import CheckpointError
from megatron_elastic.model import HybridLM
from megatron_elastic.checkpoint import native as ckpt
from megatron_elastic.model.params import NO_DECAY
from megatron_elastic.utils.io import contained_path, fsync_path, fsync_tree, load_safetensors, read_json, write_json

ROUTER_PREFIX = "router."


# ---------------------------------------------------------------------- names and orders
def _meta_model(config) -> HybridLM:
    with torch.device("meta"):
        return HybridLM(config, init=False)


def full_parameter_order(config, router=None) -> tuple[list[str], list[str], list[str]]:
    """Names in a single-process optimizer's order: (decayed, not decayed, router)."""
    names = [n for n, _ in _meta_model(config).named_parameters()]
    decay = [n for n in names if not n.endswith(NO_DECAY)]
    no_decay = [n for n in names if n.endswith(NO_DECAY)]
    routed = [ROUTER_PREFIX + n for n, _ in router.named_parameters()] if router is not None else []
    return decay, no_decay, routed


def _local_names(model, router=None) -> dict[int, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    if router is not None:
        names.update({id(p): ROUTER_PREFIX + n for n, p in router.named_parameters()})
    return names


# ---------------------------------------------------------------------- TP pieces
class _Slicer:
    """Maps between a rank's local tensors and the full single-device tensors (identity at TP=1)."""

    def __init__(self, model, groups, config):
        self.tp_size, self.tp_rank = groups.tp_size, groups.tp_rank
        self.local = self.full = None
        if self.tp_size > 1:
            from megatron_elastic.model.layout import component_layout

            self.local = {n: component_layout(config, n, p.dim(), self.tp_size) for n, p in model.named_parameters()}
            self.full = {c.key: c.local_slice for n, p in _meta_model(config).named_parameters()
                         for c in component_layout(config, n, p.dim(), 1)}  # fmt: skip

    def to_local(self, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.local is None or name not in self.local:
            return full
        out = torch.empty_like(like)
        for comp in self.local[name]:
            piece = full[self.full[comp.key]]
            if comp.shard_axis is not None:
                piece = piece.chunk(self.tp_size, dim=comp.shard_axis)[self.tp_rank]
            out[comp.local_slice] = piece
        return out

    def pieces(self, name: str, local: torch.Tensor) -> dict[str, tuple[torch.Tensor, int | None]]:
        """component key -> (this rank's piece, shard axis)."""
        if self.local is None or name not in self.local:
            return {name: (local, None)}
        return {c.key: (local[c.local_slice], c.shard_axis) for c in self.local[name]}

    def assemble_into(self, name: str, out: torch.Tensor, per_rank: list[torch.Tensor]) -> None:
        """Fill the full tensor ``out`` of parameter ``name`` from every TP rank's local tensor (rank
        order), piece by piece into views of ``out`` (no temporary of a component's size)."""
        pieces = [self.pieces(name, t) for t in per_rank]
        for key, (piece, axis) in pieces[0].items():
            dst = out[self.full[key]]
            if axis is None:
                dst.copy_(piece)  # replicated over TP: rank 0's copy
                continue
            for part, rank_pieces in zip(dst.chunk(self.tp_size, dim=axis), pieces):
                part.copy_(rank_pieces[key][0])


# ---------------------------------------------------------------------- dist_checkpointing
def _logger_global_rank(g) -> int:
    # megatron's default order: rank = tp_rank + tp * (dp_rank + dp * pp_rank)
    return (g.pp_size - 1) * g.dp_size * g.tp_size


@dataclass(frozen=True)
class _Place:
    """Where this process sits in the layout (a lone process: the defaults)."""

    tp: int = 1
    tp_rank: int = 0
    pp: int = 1
    dp: int = 1
    dp_rank: int = 0
    rank: int = 0
    world: int = 1
    logger: int = 0  # global rank of the logging rank

    @classmethod
    def of(cls, g) -> _Place:
        if not g.distributed:
            return cls()
        return cls(g.tp_size, g.tp_rank, g.pp_size, g.dp_size, g.dp_rank, g.rank, g.world_size, _logger_global_rank(g))

    def layout(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}


@contextlib.contextmanager
def _process_group():
    """dist_checkpointing speaks through torch.distributed: a lone process gets a one-rank gloo group."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _is_torch_optimizer(optimizer) -> bool:
    """A torch AdamW (the single-process state format) rather than megatron-core's optimizer."""
    return isinstance(optimizer, torch.optim.Optimizer)


def _torch_part(optimizer):
    """The torch AdamW whose state :func:`_entries` writes: the whole optimizer, or the router's
    beside megatron-core's (None: there is none)."""
    return optimizer if _is_torch_optimizer(optimizer) else optimizer.router


def _megatron_sharded(model, optimizer, place: _Place, *, is_loading: bool) -> dict:
    """megatron-core's optimizer state as its own sharded state dict, keyed by global parameter names."""
    from megatron.core.dist_checkpointing import ShardedTensor

    # Which checkpoint tensor each parameter's optimizer state is (the distributed optimizer keys its
    # buckets by the TP x PP rank instead). DP replicas are not main. Under TP each rank's parameter
    # is one block of a tensor stacked over the TP ranks along dim 0, named for that TP size: packed
    # Mamba shards are not contiguous pieces of the global tensor, so this state is read back at the
    # same TP x PP only (checked at load; the model's own tensors reshard anyway).
    if place.tp == 1:
        model_sd = {n: ShardedTensor.from_rank_offsets(f"param.{n}", p, replica_id=(0, 0, place.dp_rank))
                    for n, p in model.named_parameters()}  # fmt: skip
    else:
        model_sd = {n: ShardedTensor.from_rank_offsets(f"param.tp{place.tp}.{n}", p, (0, place.tp_rank, place.tp),
                                                       replica_id=(0, 0, place.dp_rank))
                    for n, p in model.named_parameters()}  # fmt: skip
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading)


def _optimizer_kind(optimizer) -> str:
    if _is_torch_optimizer(optimizer):
        return "torch"
    return "megatron-core distributed" if optimizer.distributed else "megatron-core"


def _entries(model, optimizer, config, place: _Place, *, with_missing_state: bool = False):
    """(key, view, shard axis, replica id) of every tensor a checkpoint holds for this rank.

    Views alias the live parameters and AdamW moments (``t[c.local_slice]`` is this rank's piece of
    the global tensor ``c.key``). With ``with_missing_state`` parameters without AdamW state yet get
    a zero state first, so that a load can fill it. ``optimizer``: a torch AdamW or None."""
    from megatron_elastic.model.layout import component_layout

    replicated = place.tp_rank * place.dp + place.dp_rank
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for n, p in model.named_parameters():
        for c in component_layout(config, n, p.dim(), place.tp):
            out.append(
                (c.key, p.data[c.local_slice], c.shard_axis, replicated if c.shard_axis is None else place.dp_rank)
            )
    for group in optimizer.param_groups if optimizer is not None else []:
        router = bool(group.get("is_router"))
        for i, p in enumerate(group["params"]):
            st = optimizer.state.get(p)
            if not st and with_missing_state:
                st = optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                           "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}  # fmt: skip
            if not st:
                continue
            if router:  # replicated on every rank (gradients all-reduced): written by global rank 0
                out.append((f"optim.step.router.{i}", st["step"].view(1), None, place.rank))
                out += [(f"optim.{k}.router.{i}", st[k], None, place.rank) for k in ("exp_avg", "exp_avg_sq")]
                continue
            n = names[id(p)]
            out.append((f"optim.step.{n}", st["step"].view(1), None, replicated))
            for c in component_layout(config, n, p.dim(), place.tp):
                rid = replicated if c.shard_axis is None else place.dp_rank
                out += [
                    (f"optim.{k}.{c.key}", st[k][c.local_slice], c.shard_axis, rid) for k in ("exp_avg", "exp_avg_sq")
                ]
    return out


def _sharded(key: str, data: torch.Tensor, axis: int | None, rid: int, place: _Place):
    from megatron.core.dist_checkpointing import ShardedTensor

    if axis is None:
        return ShardedTensor.from_rank_offsets(key, data, replica_id=rid)
    return ShardedTensor.from_rank_offsets(key, data, (axis, place.tp_rank, place.tp), replica_id=rid)


def _sync_save_strategy():
    """megatron-core's torch_dist format, written synchronously without CUDA calls (see the module doc)."""
    import torch.distributed.checkpoint as tdc
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class SyncTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            # Exactly the translation TorchDistSaveShardedStrategy.async_save does (non-main replicas
            # dropped, MCore -> PyT sharded tensors), then PyTorch's synchronous writer and planner.
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            tdc.save(mcore_to_pyt_state_dict(state, False), storage_writer=tdc.FileSystemWriter(checkpoint_dir),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))  # fmt: skip

    return SyncTorchDistSave("torch_dist", 1)


def save(ckpt_root: Path, *, step: int, model, optimizer, groups, config, trainer_state: dict, config_yaml: str,
         keep_last: int, extra: dict | None = None) -> Path | None:  # fmt: skip
    """Write a checkpoint of ``step`` (collective: every rank calls it). Returns its path on the logging
    rank, None elsewhere. ``config``: the model config; ``trainer_state``: what resuming needs besides
    weights, optimizer and RNG (the layout is added here); ``extra``: as in :func:`native.save_checkpoint`."""
    from megatron.core import dist_checkpointing as dc
    from megatron.core.dist_checkpointing import ShardedObject

    g = groups
    trainer_state = {**trainer_state, "layout": _Place.of(g).layout()}
    if g.tp_size == 1 and g.pp_size == 1 and _is_torch_optimizer(optimizer):
        # Data parallelism only: every rank holds exactly the single-process model and optimizer, so
        # the logging rank writes the single-process format (a native model directory that
        # `importance` / `extract` / `load_pretrained` read); sharding would not spread any I/O.
        path = None
        if g.is_logging_rank:
            path = ckpt.save_checkpoint(ckpt_root, step=step, model=model, optimizer=optimizer,
                                        trainer_state=trainer_state, config_yaml=config_yaml, keep_last=keep_last,
                                        extra=extra)  # fmt: skip
        if g.distributed:
            dist.barrier()
        return path
    place = _Place.of(g)
    root, name = ckpt_root, ckpt.step_dirname(step)
    tmp, dst = root / f".{name}.tmp-dist", root / name
    with _process_group():
        if place.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
            tmp.mkdir()
        dist.barrier()
        sd = {key: _sharded(key, view, axis, rid, place)
              for key, view, axis, rid in _entries(model, _torch_part(optimizer), config, place)}  # fmt: skip
        if not _is_torch_optimizer(optimizer):
            sd["optimizer"] = _megatron_sharded(model, optimizer, place, is_loading=False)
        sd["rng"] = ShardedObject("rng", ckpt.rng_state(), (place.world,), (place.rank,), replica_id=0)
        sd["megatron_elastic"] = {"layout": place.layout(), "logging_rank": place.logger,
                                  "optimizer": _optimizer_kind(optimizer)}  # common: equal on all ranks
        dc.save(sd, str(tmp), sharded_strategy=_sync_save_strategy())
        if g.is_logging_rank:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # train.params_dtype
            _write_small_files(tmp, config, trainer_state, config_yaml, extra, dtype)
        dist.barrier()
        if place.rank == 0:
            ckpt.write_manifest(tmp, unhashed=(".distcp",))  # the shards: sizes only (GBs per rank at scale)
            fsync_tree(tmp)
            if dst.exists():  # a rerun of the same step: keep the old one until the new one is in place
                old = root / f".{name}.old-dist"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(dst, old)
                os.rename(tmp, dst)
                shutil.rmtree(old)
            else:
                os.rename(tmp, dst)
            fsync_path(root)
            ckpt.publish(root, name, keep_last)
        dist.barrier()  # nobody goes on (or exits) before the checkpoint is published
    return dst if g.is_logging_rank else None


def _write_small_files(tmp: Path, config, trainer_state: dict, config_yaml: str, extra: dict | None,
                       dtype: str) -> None:  # fmt: skip
    """What the single-process format holds besides weights, optimizer and RNG (same names)."""
    write_json(tmp / "trainer_state.json", trainer_state)
    write_json(tmp / "megatron_elastic.json", {
        "format": "megatron-elastic-model", "format_version": 1, "model": config.to_dict(),
        "num_parameters": sum(p.numel() for p in _meta_model(config).parameters()), "dtype": dtype,
        "weights": "megatron-core dist_checkpointing (torch_dist)",
    })  # fmt: skip
    (tmp / "config.yaml").write_text(config_yaml)
    ckpt.write_extra_files(tmp, extra)


def _first_line(exc: BaseException) -> str:
    # torch.distributed.checkpoint wraps each rank's error in ``failures``: name the first one
    inner = next(iter(getattr(exc, "failures", {}).values()), None)
    exc = inner if isinstance(inner, BaseException) else exc
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _unreadable():
    import pickle

    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    # what megatron-core and torch.distributed.checkpoint raise on a truncated or damaged directory
    return (CheckpointingException, CheckpointException, RuntimeError, OSError, ValueError, KeyError, EOFError,
            pickle.UnpicklingError)  # fmt: skip


# Globals a torch.distributed.checkpoint ``.metadata`` file may name (its own dataclasses, dtypes, sizes).
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}  # fmt: skip


def check_safe_to_unpickle(path: Path) -> None:
    """torch.distributed.checkpoint unpickles ``.metadata`` and every byte entry (megatron-core's
    ShardedObjects: the RNG states) with no restriction, so a checkpoint from a shared filesystem
    could run code there. Read them first the safe way: ``.metadata`` naming only checkpoint
    metadata classes, dtypes and sizes; each byte entry with ``weights_only`` (tensors and plain
    values), from a file inside ``path``. Anything else is refused with one line."""
    import io
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            allowed = module == "torch.distributed.checkpoint.metadata" or (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))  # fmt: skip
            if not allowed:
                raise pickle.UnpicklingError(f"global {module}.{name} is not checkpoint metadata")
            return super().find_class(module, name)

    def refuse(what: str, exc: BaseException) -> CheckpointError:
        return CheckpointError(f"checkpoint {str(path)!r}: {what} holds objects other than checkpoint data ({exc}); "
                               "it is corrupt or unsafe (unpickling it could run code), so it is refused: resume "
                               "from an older step_* directory or start a new run_dir")  # fmt: skip

    try:
        with open(path / ".metadata", "rb") as f:
            meta = Unpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise refuse(".metadata", exc) from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, OSError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has unreadable dist_checkpointing metadata "
                              f"({_first_line(exc)}); it is truncated or corrupt: resume from an older step_* "
                              "directory or start a new run_dir") from None  # fmt: skip
    try:
        entries = [(fqn, meta.storage_data[MetadataIndex(fqn)]) for fqn, m in meta.state_dict_metadata.items()
                   if isinstance(m, BytesStorageMetadata)]  # fmt: skip
    except (AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has malformed dist_checkpointing metadata "
                              f"({_first_line(exc)}); it is corrupt: resume from an older step_* directory or start "
                              "a new run_dir") from None  # fmt: skip
    for fqn, info in entries:
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"checkpoint {str(path)!r}: entry {fqn!r} is stored with transforms "
                                  f"{list(info.transform_descriptors)}, which this reader does not check; refused")  # fmt: skip
        file = contained_path(path, info.relative_path, "dist_checkpointing file")
        with open(file, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            ckpt.load_torch_state(io.BytesIO(data))
        except pickle.UnpicklingError as exc:
            raise refuse(f"entry {fqn!r}", str(exc).strip().splitlines()[-1][:160]) from None
        except (RuntimeError, EOFError, ValueError, OSError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: entry {fqn!r} could not be read ({_first_line(exc)}); "
                                  "it is truncated or corrupt: resume from an older step_* directory or start a new "
                                  "run_dir") from None  # fmt: skip


def _load_dist(path: Path, model, optimizer, config, place: _Place) -> tuple[dict, dict]:
    """Fill this rank's pieces from a dist checkpoint of any layout; returns (trainer state, RNG)."""
    from megatron.core import dist_checkpointing as dc
    from megatron.core.dist_checkpointing import ShardedObject

    trainer_state = read_json(path / "trainer_state.json", "trainer state")
    check_safe_to_unpickle(path)
    unreadable = _unreadable()
    try:
        saved = set(dc.load_tensors_metadata(str(path)))
        common = dc.load_common_state_dict(str(path))["megatron_elastic"]
    except unreadable as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has unreadable dist_checkpointing metadata "
                              f"({_first_line(exc)}); it is truncated or "
                              "corrupt: resume from an older step_* directory or start a new run_dir") from None  # fmt: skip
    kind = common.get("optimizer", "torch")
    if kind != _optimizer_kind(optimizer):
        raise CheckpointError(f"checkpoint {str(path)!r} holds {kind} optimizer state but this run uses the "
                              f"{_optimizer_kind(optimizer)} optimizer (train.params_dtype / "
                              "parallel.distributed_optimizer differ); resume with the settings it was written "
                              "with or use a new run_dir")  # fmt: skip
    torch_part = _torch_part(optimizer)
    entries = _entries(model, torch_part, config, place, with_missing_state=True)
    missing = [k for k, _, _, _ in entries if k not in saved and not k.startswith("optim.")]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing[0]!r}; it was written for another model: "
                              "use the checkpoint's model config or a new run_dir")  # fmt: skip
    sd = {k: _sharded(k, torch.empty(v.shape, dtype=v.dtype, device=v.device), a, r, place)
          for k, v, a, r in entries if k in saved}  # fmt: skip
    saved_layout = common["layout"]
    if kind != "torch":
        here = place.layout()
        if (saved_layout["tp"], saved_layout["pp"]) != (here["tp"], here["pp"]):
            raise CheckpointError(f"checkpoint {str(path)!r} holds {kind} optimizer state written at "
                                  f"tp={saved_layout['tp']} pp={saved_layout['pp']}, which reshards over data "
                                  f"parallelism only; resume at parallel.tp={saved_layout['tp']} "
                                  f"parallel.pp={saved_layout['pp']} (any dp)")  # fmt: skip
        sd["optimizer"] = _megatron_sharded(model, optimizer, place, is_loading=True)
    # The same layout: every rank takes its own generators back (exact resume); another layout
    # takes the logging rank's, as the single-process format does.
    src = place.rank if saved_layout == place.layout() else common["logging_rank"]
    world = saved_layout["tp"] * saved_layout["pp"] * saved_layout["dp"]
    sd["rng"] = ShardedObject("rng", None, (world,), (src,), replica_id=0)
    try:
        out = dc.load(sd, str(path), validate_access_integrity=False)
    except unreadable as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read ({_first_line(exc)}); "
                              "it is truncated or corrupt: resume from an older step_* directory or start a new run_dir") from None  # fmt: skip
    with torch.no_grad():
        for k, view, _, _ in entries:
            if k in saved:
                view.copy_(out[k].view(view.shape))
        if kind != "torch":  # fp32 main weights (with float32 weights: views of them) and moments
            optimizer.load_sharded_state_dict(out["optimizer"])
    # A parameter that had no AdamW state when the checkpoint was written has none now.
    names = {id(p): n for n, p in model.named_parameters()}
    for group in torch_part.param_groups if torch_part is not None else []:
        for i, p in enumerate(group["params"]):
            key = f"optim.step.router.{i}" if group.get("is_router") else f"optim.step.{names[id(p)]}"
            if key not in saved:
                torch_part.state.pop(p, None)
    return trainer_state, out["rng"]


def load_checkpoint(path: Path, *, model, optimizer) -> tuple[dict, dict]:
    """A checkpoint of either format and any layout into the single-device model and its AdamW, in one
    process; returns (trainer_state, rng_state). Validates first."""
    if not ckpt.is_dist_checkpoint(path):
        return ckpt.load_native(path, model=model, optimizer=optimizer)
    ckpt.validate_checkpoint(path, model.config)
    with _process_group():  # written by a parallel run: read as one TP=1 x PP=1 rank
        return _load_dist(path, model, optimizer, model.config, _Place())


def load(path: Path, *, model, optimizer, groups, config, router=None) -> tuple[dict, dict]:
    """Restore this rank's piece of the model and AdamW state from a checkpoint of any layout; returns
    (trainer_state, rng_state). ``config``: the model config; ``router``: the elastic router, if any."""
    ckpt.validate_checkpoint(path, config)
    if ckpt.is_dist_checkpoint(path):
        with _process_group():
            return _load_dist(path, model, optimizer, config, _Place.of(groups))
    if not _is_torch_optimizer(optimizer):
        raise CheckpointError(f"checkpoint {str(path)!r} holds torch optimizer state but this run uses the "
                              "megatron-core optimizer (train.params_dtype / parallel.distributed_optimizer differ); "
                              "resume with the settings it was written with or use a new run_dir")  # fmt: skip
    return _load_native(path, model, optimizer, groups, config, router)


def _load_native(path: Path, model, optimizer, groups, config, router) -> tuple[dict, dict]:
    """A single-process checkpoint: every rank reads the full tensors and cuts out its piece."""
    trainer_state = read_json(path / "trainer_state.json", "trainer state")
    full = load_safetensors(path / ckpt.WEIGHTS_FILE, dtype=torch.float32)
    opt_sd, rng = ckpt.read_optimizer_and_rng(path)
    slicer = _Slicer(model, groups, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(slicer.to_local(n, full[n], p))
    decay, no_decay, routed = full_parameter_order(config, router)
    order = decay + no_decay + routed
    saved = opt_sd["state"]
    names = _local_names(model, router)
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            entry = saved.get(order.index(n))
            if entry is None:
                optimizer.state.pop(p, None)
                continue
            st = {"step": entry["step"].clone()}
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = (
                    (entry[k] if n.startswith(ROUTER_PREFIX) else slicer.to_local(n, entry[k], p)).to(p.device).clone()
                )
            optimizer.state[p] = st
    return trainer_state, rng


# ---------------------------------------------------------------------- export (the many-in-one parent)
@dataclass
class ExportStats:
    """What a streamed export held on one rank, by its own count: the most bytes of export buffers
    alive at once (gathered TP pieces, an assembled tensor, a received one, its CPU copy; the live
    parameters themselves are not counted) against the largest single tensor of the model."""

    peak_bytes: int = 0
    largest_tensor_bytes: int = 0
    tensors: int = 0  # tensors this rank yielded (the writer: all of them)
    held_bytes: int = 0

    def hold(self, *tensors: torch.Tensor) -> None:
        self.held_bytes += sum(t.numel() * t.element_size() for t in tensors)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def release(self, *tensors: torch.Tensor) -> None:
        self.held_bytes -= sum(t.numel() * t.element_size() for t in tensors)


def stream_full_tensors(model, groups, config, *,
                        stats: ExportStats | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """The single-device model's tensors, assembled one at a time from this layout's pieces; collective:
    every rank must exhaust it. Yields ``(native name, full CPU tensor)`` on the logging rank, in the
    order its safetensors file holds them (``utils.io.safetensors_order``), and nothing elsewhere.

    Per tensor: the TP ranks of the stage holding it (data-parallel replica 0) gather their local
    tensors onto their first rank, which fills the full tensor; a stage other than the last sends it
    to the logging rank (the first rank of the last stage, in its pipeline group). So a rank holds at
    most one full tensor and its TP pieces (plus the CPU copy on a GPU), whatever the model's size,
    and nothing of the optimizer is read: the many-in-one checkpoint holds weights only.
    ``model``: this rank's part; ``config``: the model config; ``stats``: filled with this rank's peak."""
    from megatron_elastic.convert.native import native_tensor_specs
    from megatron_elastic.utils.io import safetensors_order

    g = groups
    stats = stats if stats is not None else ExportStats()
    specs = native_tensor_specs(config)
    stats.largest_tensor_bytes = max(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
    if g.dp_rank != 0:
        return  # a data-parallel replica holds copies of replica 0's pieces
    local = dict(model.named_parameters())
    owners = [sorted(local)]
    if g.pp_size > 1:
        owners = [None] * g.pp_size
        dist.all_gather_object(owners, sorted(local), group=g.pp)  # names only
    owner_of = {n: stage for stage, names in enumerate(owners) for n in names}
    slicer = _Slicer(model, g, config)
    last = g.pp_size - 1
    for name in safetensors_order(specs):
        dtype, shape = specs[name]
        assert name in owner_of, f"no pipeline stage holds {name!r}"
        stage, full, held = owner_of[name], None, False
        if stage == g.pp_rank:
            full, held = _gather_full(name, local[name].detach(), shape, dtype, slicer, g, stats)
        if stage != last and g.tp_rank == 0:
            if g.pp_rank == stage:
                dist.send(full, dst=dist.get_global_rank(g.pp, last))
                if held:
                    stats.release(full)
                del full
                continue
            if g.pp_rank == last:
                full, held = torch.empty(shape, dtype=dtype, device=g.device), True
                stats.hold(full)
                dist.recv(full, src=dist.get_global_rank(g.pp, stage))
        if not g.is_logging_rank:
            continue
        out = full.to("cpu", dtype)
        if out is not full:
            stats.hold(out)
            if held:
                stats.release(full)
            held = True
        del full
        stats.tensors += 1
        yield name, out
        if held:
            stats.release(out)
        del out


def _gather_full(name, p, shape, dtype, slicer: _Slicer, g, stats: ExportStats) -> tuple[torch.Tensor | None, bool]:
    """(Parameter ``name``'s full tensor on the stage's first TP rank, None on the others; whether it is
    a new buffer): gathered and filled when TP shards it, else the rank's own parameter."""
    sharded = slicer.local is not None and any(c.shard_axis is not None for c in slicer.local.get(name, ()))
    if not sharded:
        if g.tp_rank != 0:
            return None, False
        full = p.to(dtype)
        if full is not p:
            stats.hold(full)
        return full, full is not p
    parts = [torch.empty_like(p) for _ in range(g.tp_size)] if g.tp_rank == 0 else None
    if parts is not None:
        stats.hold(*parts)
    dist.gather(p.contiguous(), parts, dst=dist.get_global_rank(g.tp, 0), group=g.tp)
    if parts is None:
        return None, False
    full = torch.empty(shape, dtype=dtype, device=p.device)
    stats.hold(full)
    slicer.assemble_into(name, full, parts)
    stats.release(*parts)
    del parts
    return full, True
