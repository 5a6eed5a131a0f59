"""Checkpoints of a parallel run in the single-process format, so any layout resumes any other.

A parallel run writes exactly what :mod:`megatron_elastic.training.checkpoint` writes (the full
model as ``model.safetensors``, ``optimizer.pt`` indexed as a single-process AdamW would index it,
trainer state, RNG, config, and the elastic trainer's router / space files), atomically through the
same ``save_checkpoint``. Every rank reads the full tensors back and keeps its own piece: its
pipeline stage's parameters (names are global, see :mod:`parallel.pipeline`) and, under tensor
parallelism, its slice of each packed component (``parallel.tensor.tp_component_slices``). AdamW's
moments are cut the same way. Hence a TP=2 x PP=2 checkpoint resumes at TP=1 x PP=1 and back, a
single-process checkpoint resumes in parallel, and a resume at the same layout is exact.

The pieces travel to the first rank of the last stage with ``gather_object`` on save. That is the
simple path for models that fit one host's memory; megatron-core ``dist_checkpointing`` (each rank
writes its own shards) is the path for 12B-scale runs, but its writer needs ``psutil``, which this
environment does not provide (see docs/parallelism.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_elastic.config import dump_config
from megatron_elastic.model import HybridLM
from megatron_elastic.training import checkpoint as ckpt
from megatron_elastic.training.trainer import _NO_DECAY

ROUTER_PREFIX = "router."


# ---------------------------------------------------------------------- names and orders
def _meta_model(config) -> HybridLM:
    with torch.device("meta"):
        return HybridLM(config, init=False)


def full_parameter_order(config, router=None) -> tuple[list[str], list[str], list[str]]:
    """Names in a single-process optimizer's order: (decayed, not decayed, router)."""
    names = [n for n, _ in _meta_model(config).named_parameters()]
    decay = [n for n in names if not n.endswith(_NO_DECAY)]
    no_decay = [n for n in names if n.endswith(_NO_DECAY)]
    routed = [ROUTER_PREFIX + n for n, _ in router.named_parameters()] if router is not None else []
    return decay, no_decay, routed


def _local_names(trainer) -> dict[int, str]:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    router = getattr(trainer, "router", None)
    if router is not None:
        names.update({id(p): ROUTER_PREFIX + n for n, p in router.named_parameters()})
    return names


# ---------------------------------------------------------------------- TP pieces
class _Slicer:
    """Maps between a rank's local tensors and the full single-device tensors (identity at TP=1)."""

    def __init__(self, trainer):
        g = trainer.groups
        self.tp_size, self.tp_rank = g.tp_size, g.tp_rank
        self.local = self.full = None
        if self.tp_size > 1:
            from megatron_elastic.parallel.tensor import component_layout

            config = trainer.cfg.model
            self.local = {n: component_layout(config, n, p.dim(), self.tp_size) for n, p in trainer.model.named_parameters()}
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

    def assemble(self, name: str, full_shape, per_rank: list[dict]) -> torch.Tensor:
        """Full tensor of parameter ``name`` from every TP rank's pieces (rank order)."""
        if self.full is None:
            return per_rank[0][name][0]
        out = None
        for key in per_rank[0]:
            axis = per_rank[0][key][1]
            parts = [r[key][0] for r in per_rank]
            value = parts[0] if axis is None else torch.cat(parts, dim=axis)
            if out is None:
                out = torch.empty(full_shape, dtype=value.dtype)
            out[self.full[key]] = value
        return out



# ---------------------------------------------------------------------- gather
def _local_payload(trainer, slicer: _Slicer) -> dict:
    """This rank's parameters and AdamW state, cut into TP pieces, keyed by global names."""
    params, state = {}, {}
    names = _local_names(trainer)
    for n, p in trainer.model.named_parameters():
        params[n] = {k: (v.detach().cpu(), a) for k, (v, a) in slicer.pieces(n, p.detach()).items()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            st = trainer.optimizer.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            entry = {"step": st["step"].detach().cpu().clone()}
            for k in ("exp_avg", "exp_avg_sq"):
                entry[k] = {kk: (v.detach().cpu(), a) for kk, (v, a) in
                            (slicer.pieces(n, st[k]) if not n.startswith(ROUTER_PREFIX) else {n: (st[k], None)}).items()}  # fmt: skip
            state[n] = entry
    return {"tp_rank": trainer.groups.tp_rank, "pp_rank": trainer.groups.pp_rank, "params": params, "state": state}


def _gather_to_logger(trainer, payload):
    """Payloads of every (tp, pp) rank of data-parallel replica 0, on the logging rank."""
    g = trainer.groups
    if not g.distributed:
        return [payload]
    # Every rank takes part (gather_object is a collective over the world); replicas > 0 send None.
    mine = payload if g.dp_rank == 0 else None
    dst = _logger_global_rank(g)
    out = [None] * g.world_size if g.rank == dst else None
    dist.gather_object(mine, out, dst=dst)
    return None if out is None else [p for p in out if p is not None]


def _logger_global_rank(g) -> int:
    # megatron's default order: rank = tp_rank + tp * (dp_rank + dp * pp_rank)
    return (g.pp_size - 1) * g.dp_size * g.tp_size


def _merge(trainer, payloads: list[dict]):
    """(full parameters by name, full AdamW state by name) from every rank's payload."""
    slicer = _Slicer(trainer)
    meta = dict(_meta_model(trainer.cfg.model).named_parameters())
    by_name: dict[str, list[dict]] = {}
    state_by_name: dict[str, dict[str, list[dict]]] = {}
    steps: dict[str, torch.Tensor] = {}
    for pl in sorted(payloads, key=lambda x: (x["pp_rank"], x["tp_rank"])):
        for n, pieces in pl["params"].items():
            by_name.setdefault(n, []).append(pieces)
        for n, entry in pl["state"].items():
            steps[n] = entry["step"]
            for k in ("exp_avg", "exp_avg_sq"):
                state_by_name.setdefault(n, {}).setdefault(k, []).append(entry[k])
    params = {n: slicer.assemble(n, meta[n].shape, per_rank) for n, per_rank in by_name.items()}
    state = {}
    for n, moments in state_by_name.items():
        if n.startswith(ROUTER_PREFIX):
            state[n] = {"step": steps[n], **{k: v[0][n][0] for k, v in moments.items()}}
        else:
            state[n] = {"step": steps[n], **{k: slicer.assemble(n, meta[n].shape, v) for k, v in moments.items()}}
    return params, state


class _ModelView:
    """What save_checkpoint reads from a model, for a state assembled from many ranks."""

    def __init__(self, state: dict, config):
        self._state, self.config = state, config

    def state_dict(self):
        return self._state

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self._state.values())


class _OptimizerView:
    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self):
        return self._sd


def _optimizer_state_dict(trainer, state: dict) -> dict:
    """A single-process AdamW state dict (indices in build_optimizer's order) from names."""
    decay, no_decay, routed = full_parameter_order(trainer.cfg.model, getattr(trainer, "router", None))
    order = decay + no_decay + routed
    index = {n: i for i, n in enumerate(order)}
    groups, spans = [], [decay, no_decay] + ([routed] if routed else [])
    for group, names in zip(trainer.optimizer.param_groups, spans):
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": [index[n] for n in names]})
    return {"state": {index[n]: s for n, s in state.items()}, "param_groups": groups}


# ---------------------------------------------------------------------- the trainer's entry points
def save(trainer) -> Path | None:
    """Write a checkpoint of the current step (collective: every rank calls it)."""
    g = trainer.groups
    if g.pp_size == 1 and g.tp_size == 1:
        path = None
        if g.is_logging_rank:  # the model and optimizer are exactly the single-process ones
            path = _write(trainer, trainer.model, trainer.optimizer)
        _barrier(g)
        return path
    slicer = _Slicer(trainer)
    payloads = _gather_to_logger(trainer, _local_payload(trainer, slicer))
    path = None
    if payloads is not None:
        params, state = _merge(trainer, payloads)
        if getattr(trainer, "router", None) is not None:
            for n, p in trainer.router.named_parameters():
                params.pop(ROUTER_PREFIX + n, None)
        path = _write(trainer, _ModelView(params, trainer.cfg.model), _OptimizerView(_optimizer_state_dict(trainer, state)))
    _barrier(g)
    return path


def _write(trainer, model, optimizer) -> Path:
    state = {"step": trainer.step, "consumed_samples": trainer.consumed_samples,
             "loader": trainer.data.train_loader.state_dict(), **trainer.extra_trainer_state(),
             "layout": {"tp": trainer.groups.tp_size, "pp": trainer.groups.pp_size, "dp": trainer.groups.dp_size}}  # fmt: skip
    return ckpt.save_checkpoint(trainer.ckpt_root, step=trainer.step, model=model, optimizer=optimizer, trainer_state=state,
                                config_yaml=dump_config(trainer.cfg), keep_last=trainer.cfg.train.keep_last,
                                extra=trainer.extra_checkpoint_state())  # fmt: skip


def _barrier(g) -> None:
    if g.distributed:
        dist.barrier()


def latest(trainer) -> Path | None:
    return ckpt.latest_checkpoint(trainer.ckpt_root)


def load(trainer, path: Path) -> tuple[dict, dict]:
    """Restore this rank's piece of the model and AdamW state from a checkpoint of any layout."""
    from megatron_elastic.utils.io import load_safetensors, read_json

    ckpt.validate_checkpoint(path, trainer.cfg.model)
    trainer_state = read_json(path / "trainer_state.json", "trainer state")
    full = load_safetensors(path / ckpt.WEIGHTS_FILE, dtype=torch.float32)
    opt_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    slicer = _Slicer(trainer)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            p.copy_(slicer.to_local(n, full[n], p))
    decay, no_decay, routed = full_parameter_order(trainer.cfg.model, getattr(trainer, "router", None))
    order = decay + no_decay + routed
    saved = opt_sd["state"]
    names = _local_names(trainer)
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            entry = saved.get(order.index(n))
            if entry is None:
                trainer.optimizer.state.pop(p, None)
                continue
            st = {"step": entry["step"].clone()}
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = (entry[k] if n.startswith(ROUTER_PREFIX) else slicer.to_local(n, entry[k], p)).to(p.device).clone()
            trainer.optimizer.state[p] = st
    return trainer_state, rng


def set_rng(rng: dict) -> None:
    ckpt.set_rng_state(rng)


def gather_full_model(trainer) -> HybridLM | None:
    """The single-device model with the current weights, on the logging rank (None elsewhere)."""
    g = trainer.groups
    if g.pp_size == 1 and g.tp_size == 1:
        return trainer.model if g.is_logging_rank else None
    payloads = _gather_to_logger(trainer, _local_payload(trainer, _Slicer(trainer)))
    if payloads is None:
        return None
    params, _ = _merge(trainer, payloads)
    model = HybridLM(trainer.cfg.model, init=False)
    model.load_state_dict({n: params[n] for n, _ in model.named_parameters()}, strict=False)
    return model
