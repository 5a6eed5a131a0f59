"""Trainers over a tensor x pipeline x data parallel layout, built on the single-process ones.

:class:`ParallelTrainer` and :class:`ParallelElasticTrainer` keep the loop of
:class:`~megatron_elastic.training.trainer.Trainer` (LR, resume, validation, checkpoints, signals)
and the nested step of :class:`~megatron_elastic.distill.nested.NestedStep` (sampling, routing, the
objective, the metric keys), and replace only what a layout changes:

* the model: the single-device model is built on every rank from the same seed, then tensor
  parallelism is applied (``parallel.tensor.apply_tensor_parallel``) and the rank keeps its
  pipeline stage (``parallel.pipeline``); the elastic parent and its frozen teacher (in the compute
  dtype) are split the same way on the meta device and each rank reads only its own blocks of the
  parent's files (``parallel.loading``);
* the step's execution: at ``pp == 1`` the single-process loop; at ``pp > 1`` megatron-core's 1F1B
  schedule, one schedule micro-batch per (micro-batch, budget) pair, each micro-batch's led by a
  teacher item: the frozen teacher (same stage split) runs forward once per micro-batch inside the
  student's schedule, and its logits live on the last stage only until that micro-batch's budgets are done;
* the losses: vocab-parallel cross-entropy and KL (:mod:`parallel.losses`) under ``tp > 1``;
* precision and the optimizer: with ``train.params_dtype=bfloat16`` or ``parallel.distributed_optimizer``
  the model is wrapped in megatron-core's DDP and optimized by megatron-core's mixed-precision or
  distributed optimizer (:mod:`parallel.optimizer`; fp32 main weights, moments and gradient buffer);
  float32 weights without the distributed optimizer keep the single-process trainer's AdamW;
* gradients: averaged over data-parallel ranks (:mod:`parallel.data`, or megatron-core's DDP); router gradients (replicated
  on every rank) summed over pipeline stages (each stage back-propagates into the masks its own
  layers use) and averaged over data-parallel ranks; the clipping norm is taken over all stages
  and TP shards;
* budgets and Gumbel noise are keyed by the *global* micro-batch index ``micro * dp + dp_rank``, so
  a data-parallel run draws exactly what a single process draws for the same samples;
* output: metrics, trackers and the many-in-one checkpoint only on the first rank of the last stage (a
  sharded parent streamed there tensor by tensor, never whole); every rank agrees to stop after a
  signal reaches any of them.
"""

from __future__ import annotations

import weakref
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_elastic.config import dump_config
from megatron_elastic.distill.nested import Tally, means
from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import MOE
from megatron_elastic.parallel.data import allreduce_gradients
from megatron_elastic.parallel.groups import ParallelGroups
from megatron_elastic.tracking import MultiTracker, build_trackers
from megatron_elastic.training.elastic_trainer import ElasticTrainer
from megatron_elastic.training.trainer import Trainer


class ParallelMixin:
    """The layout-dependent pieces shared by the plain and the elastic parallel trainer."""

    groups: ParallelGroups

    def _setup_parallel(self, groups: ParallelGroups, cfg) -> dict:
        self.groups = groups
        if groups.distributed and MOE in cfg.model.layer_types:
            raise ConfigError("mixture-of-experts ('E') layers train in a single process for now (the sharded "
                              "checkpoint has no expert layout yet); run without torchrun / srun, one rank")  # fmt: skip
        if groups.tp_size > 1:
            from megatron_elastic.parallel.tensor import check_tp_divisibility

            check_tp_divisibility(cfg.model, groups.tp_size, cfg.elastic)
            if cfg.elastic is not None and cfg.distill is not None and cfg.distill.top_k:
                raise ConfigError("distill.top_k > 0 is not supported with parallel.tp > 1 (the vocabulary is sharded); "
                                  "set distill.top_k=0")  # fmt: skip
        tracker = build_trackers(cfg) if groups.is_logging_rank else MultiTracker([])
        return {"tracker": tracker, "dp_rank": groups.dp_rank, "dp_world_size": groups.dp_size}

    # ------------------------------------------------------------------ precision and the optimizer
    def check_precision(self) -> None:
        """Any ``params_dtype`` and the distributed optimizer train here (megatron-core's optimizer)."""

    @property
    def uses_megatron_optimizer(self) -> bool:
        """bfloat16 weights or the distributed optimizer: megatron-core's DDP + optimizer."""
        return self.params_dtype != torch.float32 or self.cfg.parallel.distributed_optimizer

    def build_optimizer(self):
        opt = super().build_optimizer()
        if not self.uses_megatron_optimizer:
            return opt
        from megatron_elastic.parallel.optimizer import build_megatron_optimizer

        return build_megatron_optimizer(self.model, opt, self.groups, self.cfg.train, params_dtype=self.params_dtype,
                                        distributed=self.cfg.parallel.distributed_optimizer)  # fmt: skip

    # ------------------------------------------------------------------ model
    def _trained_model(self, model):
        """This rank's part of the trained model, in ``train.params_dtype``."""
        return self._parallelize(model).to(self.params_dtype)

    def _parallelize(self, model):
        """Single-device model -> this rank's part (TP applied in place, then the PP stage cut)."""
        g, p = self.groups, self.cfg.parallel
        fp8 = p.fp8 if p.fp8.enabled else None
        if g.tp_size > 1 or (fp8 is not None and g.tp is not None):
            from megatron_elastic.parallel.tensor import apply_tensor_parallel

            if fp8 is not None:  # the elastic choices too, not only the parent's shapes: every child runs FP8 GEMMs
                from megatron_elastic.parallel.tensor import check_fp8_divisibility

                check_fp8_divisibility(model.config, g.tp_size, self.cfg.elastic)
            model = apply_tensor_parallel(model, g.tp, linears="transformer_engine" if fp8 else "megatron", fp8=fp8,
                                          sequence_parallel=p.sequence_parallel)  # fmt: skip
        if g.pp_size > 1:
            from megatron_elastic.parallel.pipeline import build_stage, mcore_pipeline_config

            # stages exchange activations in the parameters' dtype (a bf16 teacher sends bf16)
            mcfg = mcore_pipeline_config(hidden_size=model.config.hidden_size, tp=g.tp_size, pp=g.pp_size,
                                         dtype=next(model.parameters()).dtype,
                                         sequence_parallel=self.cfg.parallel.sequence_parallel)  # fmt: skip
            model = build_stage(model, g.pp_size, g.pp_rank, mcore_config=mcfg)
        return model

    def _runner(self, stage):
        from megatron_elastic.parallel.pipeline import PipelineRunner

        cache = self.__dict__.setdefault("_runners", {})
        if id(stage) not in cache:
            cache[id(stage)] = PipelineRunner(stage, self.groups)
        return cache[id(stage)]

    def _run_schedule(self, stage, fwd, items: list, *, tokens: torch.Tensor, forward_only: bool = False) -> None:
        """megatron-core's schedule over ``items`` (one schedule micro-batch each, shaped like ``tokens``)."""
        self._runner(stage).run(fwd, items, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                                forward_only=forward_only)  # fmt: skip

    @property
    def is_last_stage(self) -> bool:
        return self.groups.is_last_stage

    # ------------------------------------------------------------------ losses (vocab-parallel under TP)
    def lm_loss(self, logits, labels, *, reduction="mean"):
        if self.groups.tp_size > 1:
            from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy

            loss = vocab_parallel_cross_entropy(logits, labels, self.groups.tp)
            return loss * labels.numel() if reduction == "sum" else loss
        return super().lm_loss(logits, labels, reduction=reduction)

    # ------------------------------------------------------------------ gradients
    def _model_params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def reduce_gradients(self) -> None:
        if self.cfg.parallel.sequence_parallel and self.groups.tp_size > 1:
            from megatron_elastic.parallel.tensor import allreduce_sequence_parallel_grads

            allreduce_sequence_parallel_grads(self.model)  # norms saw only this rank's positions
        if self.uses_megatron_optimizer:
            self.optimizer.finish_grad_sync()  # megatron-core's DDP: the fp32 gradient buffer
        else:
            allreduce_gradients(self._model_params(), self.groups.dp)

    def clip_gradients(self, params) -> float:
        """Global grad norm over every stage (and TP shard), clipped like torch.nn.utils.clip_grad_norm_."""
        g = self.groups
        if self.uses_megatron_optimizer:
            return self.optimizer.clip(self.cfg.train.clip_grad)  # megatron-core's, on the fp32 main gradients
        if g.pp_size == 1 and g.tp_size == 1:
            return super().clip_gradients(params)
        params = [p for p in params if p.grad is not None]
        max_norm = self.cfg.train.clip_grad
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in params:
            if g.tp_size == 1 or getattr(p, "tensor_model_parallel", False) or g.tp_rank == 0:
                sq = sq + p.grad.detach().float().pow(2).sum()  # replicated TP params counted once
        for group in (g.pp, g.tp):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
        norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(coef.to(p.grad.dtype))
        return float(norm)

    # ------------------------------------------------------------------ metrics from the last stage
    def _share_metrics(self, metrics: dict | None) -> dict:
        """The last stage's metrics on every pipeline rank (the loop checks the loss everywhere)."""
        g = self.groups
        if g.pp_size == 1:
            return metrics
        box = [metrics]
        dist.broadcast_object_list(box, src=dist.get_global_rank(g.pp, g.pp_size - 1), group=g.pp)
        return box[0]

    def _reduce_sums(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """Per-key means over data-parallel ranks from per-rank sums and counts (fixed key set)."""
        keys = sorted(sums)
        if self.groups.dp_size > 1:
            t = torch.tensor([[sums[k] for k in keys], [counts[k] for k in keys]], dtype=torch.float64,
                             device=self.device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(t, group=self.groups.dp)
            sums, counts = dict(zip(keys, t[0].tolist())), dict(zip(keys, t[1].tolist()))
        return means(sums, counts)

    # ------------------------------------------------------------------ the trainer's hooks
    def _write_metrics(self, record: dict) -> None:
        if self.groups.is_logging_rank:
            super()._write_metrics(record)

    def _truncate_metrics(self, step: int) -> None:
        if self.groups.is_logging_rank:
            super()._truncate_metrics(step)

    def stop_requested(self, stop) -> bool:
        if not self.groups.distributed:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def save(self):
        from megatron_elastic.checkpoint import dist as pckpt

        state = {"step": self.step, "consumed_samples": self.consumed_samples,
                 "loader": self.data.train_loader.state_dict(), **self.extra_trainer_state()}  # fmt: skip
        return pckpt.save(self.ckpt_root, step=self.step, model=self.model, optimizer=self.optimizer, groups=self.groups,
                          config=self.cfg.model, trainer_state=state, config_yaml=dump_config(self.cfg),
                          keep_last=self.cfg.train.keep_last, extra=self.extra_checkpoint_state())  # fmt: skip

    def load_checkpoint(self, path, *, router=None) -> tuple[dict, dict]:
        from megatron_elastic.checkpoint import dist as pckpt

        return pckpt.load(path, model=self.model, optimizer=self.optimizer, groups=self.groups,
                          config=self.cfg.model, router=router)  # fmt: skip

    # ------------------------------------------------------------------ evaluation
    def eval_loss_sum(self, tokens, labels, elastic) -> float:
        if self.groups.pp_size == 1:
            return super().eval_loss_sum(tokens, labels, elastic)
        out = []

        def fwd(item, stage):
            t, lab = item

            def loss_func(stage_logits):
                out.append(float(self.lm_loss(stage_logits, lab, reduction="sum")))
                return torch.zeros(()), {}

            return stage(t, elastic=elastic), loss_func

        self._run_schedule(self.model, fwd, [(tokens, labels)], tokens=tokens, forward_only=True)
        return out[0] if out else 0.0  # the loss exists on the last stage only

    def evaluate_loss(self, elastic=None) -> float:
        val = super().evaluate_loss(elastic)
        return self._share_metrics({"v": val} if self.is_last_stage else None)["v"]

    # ------------------------------------------------------------------ helpers for the steps
    def _next_micro_batches(self) -> list:
        return [tuple(t.to(self.device) for t in next(self.data.train_loader)) for _ in range(self.grad_accum)]


class ParallelTrainer(ParallelMixin, Trainer):
    """Plain pre-training over a TP x PP x DP layout."""

    def __init__(self, cfg, data, *, groups: ParallelGroups):
        super().__init__(cfg, data, **self._setup_parallel(groups, cfg))

    def build_model(self):
        return self._trained_model(super().build_model())

    def forward_backward(self) -> float:
        batches = self._next_micro_batches()
        losses: list[float] = []
        if self.groups.pp_size == 1:
            for tokens, labels in batches:
                with self._autocast():
                    logits = self.model(tokens)
                loss = self.lm_loss(logits, labels)
                (loss / self.grad_accum).backward()
                losses.append(float(loss.detach()))
        else:

            def fwd(item, stage):
                tokens, labels = item

                def loss_func(logits):
                    loss = self.lm_loss(logits, labels)
                    losses.append(float(loss.detach()))
                    return loss, {}  # the schedule divides by the number of micro-batches

                with self._autocast():
                    return stage(tokens), loss_func

            self._run_schedule(self.model, fwd, batches, tokens=batches[0][0])
        metrics = self._reduce_sums({"loss": sum(losses)}, {"loss": float(len(losses))}) if self.is_last_stage else None
        return self._share_metrics(metrics)["loss"]


class ParallelElasticTrainer(ParallelMixin, ElasticTrainer):
    """Elastic nested distillation over a TP x PP x DP layout (student and teacher read split from the files)."""

    def __init__(self, cfg, data, *, depth_order, parent: str | Path, groups: ParallelGroups):
        """``parent``: the parent model directory (native or Hugging Face); every rank reads its own part."""
        kw = self._setup_parallel(groups, cfg)
        self.parent_dir = Path(parent)
        super().__init__(cfg, data, depth_order=depth_order, parent=None, **kw)

    def load_parent(self, dtype: torch.dtype):
        """This rank's part of the parent (its pipeline stage, TP-sharded) in ``dtype`` on the device, read
        from the parent's files: only this part is ever read or held."""
        from megatron_elastic.parallel.loading import load_shards

        return load_shards(self.parent_dir, self._parallelize, dtype=dtype, device=self.device, what="elastic.parent")

    def build_model(self):
        return self.load_parent(self.params_dtype)

    def build_teacher(self):
        return self.load_parent(self.teacher_dtype())  # from the files too: no copy of the student

    def nested_losses(self) -> dict:
        if self.groups.tp_size == 1:
            return {}
        from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy, vocab_parallel_kl

        tp = self.groups.tp
        return {"kd": partial(vocab_parallel_kl, tp_group=tp, temperature=self.cfg.distill.temperature),
                "ce": partial(vocab_parallel_cross_entropy, tp_group=tp)}  # fmt: skip

    def load_checkpoint(self, path, *, router=None) -> tuple[dict, dict]:
        return super().load_checkpoint(path, router=self.router)

    def reduce_gradients(self) -> None:
        g = self.groups
        super().reduce_gradients()
        router = [p for p in self.router.parameters()]
        for p in router:  # a parameter no budget touched still takes part in the sums below
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if g.pp_size > 1:
            allreduce_gradients(router, g.pp, average=False)  # each stage holds the mask grads of its layers
        allreduce_gradients(router, g.dp)

    # ------------------------------------------------------------------ the nested step's execution
    teacher_logits_peak = 0  # the most teacher logits alive at once on this rank (pp > 1), over the run

    def nested_forward_backward(self, tau: float, scale: float, tally: Tally) -> None:
        """pp == 1: the single-process loop. pp > 1: megatron-core's 1F1B schedule over, per micro-batch,
        one teacher item (the frozen teacher, split like the student, run forward only on every stage:
        ``pipeline.frozen_forward``) and then one item per budget. The last stage keeps the teacher's
        logits from the teacher item to the micro-batch's last budget and drops them there, so one
        micro-batch's logits are alive at a time, however many micro-batches the step has."""
        if self.groups.pp_size == 1:
            return super().nested_forward_backward(tau, scale, tally)
        from megatron_elastic.parallel.pipeline import frozen_forward

        tokens_seen = self.consumed_samples * self.cfg.data.seq_len
        batches = self._next_micro_batches()
        chosen = [self.nested.budgets_of(self.step, self.global_micro(m), tokens_seen) for m in range(len(batches))]
        items = [(m, j) for m in range(len(batches)) for j in range(-1, len(chosen[m]))]  # j = -1: the teacher
        # The schedule divides every item's loss by len(items); the teacher items add nothing.
        weight = len(items) / sum(len(c) for c in chosen)
        teacher: dict[int, torch.Tensor] = {}
        refs = self.__dict__.setdefault("_teacher_refs", [])

        def fwd(item, stage):
            m, j = item
            tokens, labels = batches[m]
            if j < 0:
                self.teacher_forwards += 1
                with self._autocast():
                    out, zero_loss = frozen_forward(stage, self.teacher, tokens)

                def keep(logits):
                    teacher[m] = logits
                    refs[:] = [r for r in refs if r() is not None] + [weakref.ref(logits)]
                    self.teacher_logits_peak = max(self.teacher_logits_peak, len(refs))
                    return zero_loss(), {}

                return out, keep
            b_idx = chosen[m][j]
            state, cost, rl = self.nested.route(self.step, self.global_micro(m), b_idx, tau, scale)
            with self._autocast():
                out = stage(tokens, elastic=state)

            def loss(logits):
                t = teacher.pop(m) if j == len(chosen[m]) - 1 else teacher[m]
                return self.nested.objective(logits, t, labels, b_idx, cost, rl, tally) * weight, {}

            return out, loss

        self._run_schedule(self.model, fwd, items, tokens=batches[0][0])

    def reduce_means(self, tally: Tally) -> dict[str, float]:
        return self._reduce_sums(tally.sums, tally.counts) if self.is_last_stage else {}

    def step_metrics(self) -> dict[str, float]:
        metrics = super().step_metrics()
        return self._share_metrics(metrics if self.is_last_stage else None)

    def export_model(self):
        """The parent for the many-in-one checkpoint; every rank takes part. Data parallelism only: the
        model itself on the first rank. Sharded (TP or PP): its tensors, assembled one at a time on the
        logging rank (:func:`~megatron_elastic.checkpoint.dist.stream_full_tensors`) while it writes
        them, so no rank holds more than about one full tensor; the other ranks send their pieces here
        and return None. ``self.export_stats``: this rank's own count of what it held."""
        g = self.groups
        if g.pp_size == 1 and g.tp_size == 1:
            return self.model if g.is_logging_rank else None
        from megatron_elastic.checkpoint.dist import ExportStats, stream_full_tensors
        from megatron_elastic.convert.native import NativeTensors

        self.export_stats = ExportStats()
        tensors = stream_full_tensors(self.model, g, self.cfg.model, stats=self.export_stats)
        if g.is_logging_rank:
            return NativeTensors(self.cfg.model, tensors)  # consumed by manyinone.save
        for _ in tensors:  # yields nothing here: runs this rank's sends
            pass
        return None
