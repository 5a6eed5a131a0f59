"""Trainers over a tensor x pipeline x data parallel layout, built on the single-process ones.

:class:`ParallelTrainer` and :class:`ParallelElasticTrainer` keep the loop of
:class:`~megatron_elastic.training.trainer.Trainer` (resume, validation, checkpoints, signals) and
replace what a layout changes:

* the model: the single-device model is built on every rank from the same seed, then tensor
  parallelism is applied (``parallel.tensor.apply_tensor_parallel``) and the rank keeps its
  pipeline stage (``parallel.pipeline``);
* the step: at ``pp == 1`` a plain loop over micro-batches; at ``pp > 1`` megatron-core's 1F1B
  schedule, one schedule micro-batch per (micro-batch, budget) pair. The frozen teacher runs once per
  micro-batch (forward-only schedule, same stage split) before the students;
* gradients: averaged over data-parallel ranks (:mod:`parallel.data`); router gradients (replicated
  on every rank) summed over pipeline stages (each stage back-propagates into the masks its own
  layers use) and averaged over data-parallel ranks; the clipping norm is taken over all stages;
* budgets and Gumbel noise are keyed by the *global* micro-batch index ``micro * dp + dp_rank``, so
  a data-parallel run draws exactly what a single process draws for the same samples;
* output: metrics, trackers and the many-in-one checkpoint only on the first rank of the last
  stage; every rank agrees to stop after a signal reaches any of them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_elastic.checkpoint import native as ckpt
from megatron_elastic.config import dump_config
from megatron_elastic.errors import ConfigError
from megatron_elastic.parallel.data import allreduce_gradients
from megatron_elastic.parallel.groups import ParallelGroups
from megatron_elastic.tracking import MultiTracker, build_trackers
from megatron_elastic.training.elastic_trainer import ElasticTrainer, budget_tag
from megatron_elastic.training.schedule import lr_at
from megatron_elastic.training.trainer import Trainer


class ParallelMixin:
    """The layout-dependent pieces shared by the plain and the elastic parallel trainer."""

    groups: ParallelGroups

    def _setup_parallel(self, groups: ParallelGroups, cfg) -> dict:
        self.groups = groups
        if groups.tp_size > 1:
            from megatron_elastic.parallel.tensor import check_tp_divisibility

            check_tp_divisibility(cfg.model, groups.tp_size, getattr(cfg, "elastic", None))
            if cfg.elastic is not None and cfg.distill is not None and cfg.distill.top_k:
                raise ConfigError("distill.top_k > 0 is not supported with parallel.tp > 1 (the vocabulary is sharded); "
                                  "set distill.top_k=0")  # fmt: skip
        tracker = build_trackers(cfg) if groups.is_logging_rank else MultiTracker([])
        return {"tracker": tracker, "dp_rank": groups.dp_rank, "dp_world_size": groups.dp_size}

    # ------------------------------------------------------------------ model
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

            mcfg = mcore_pipeline_config(hidden_size=model.config.hidden_size, tp=g.tp_size, pp=g.pp_size,
                                         sequence_parallel=self.cfg.parallel.sequence_parallel)  # fmt: skip
            model = build_stage(model, g.pp_size, g.pp_rank, mcore_config=mcfg)
        return model

    def _runner(self, stage):
        from megatron_elastic.parallel.pipeline import PipelineRunner

        cache = self.__dict__.setdefault("_runners", {})
        if id(stage) not in cache:
            cache[id(stage)] = PipelineRunner(stage, self.groups)
        return cache[id(stage)]

    @property
    def is_last_stage(self) -> bool:
        return self.groups.is_last_stage

    # ------------------------------------------------------------------ losses (vocab-parallel under TP)
    def _ce(self, logits, labels, reduction="mean"):
        if self.groups.tp_size > 1:
            from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy

            loss = vocab_parallel_cross_entropy(logits, labels, self.groups.tp)
            return loss * labels.numel() if reduction == "sum" else loss
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction=reduction)

    # ------------------------------------------------------------------ gradients
    def _model_params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def reduce_gradients(self) -> None:
        if self.cfg.parallel.sequence_parallel and self.groups.tp_size > 1:
            from megatron_elastic.parallel.tensor import allreduce_sequence_parallel_grads

            allreduce_sequence_parallel_grads(self.model)  # norms saw only this rank's positions
        allreduce_gradients(self._model_params(), self.groups.dp)

    def _clip(self, params, max_norm: float) -> float:
        """Global grad norm over every stage (and TP shard), clipped like torch.nn.utils.clip_grad_norm_."""
        params = [p for p in params if p.grad is not None]
        g = self.groups
        if g.pp_size == 1 and g.tp_size == 1:
            if max_norm > 0:
                return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
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
        return {k: sums[k] / counts[k] for k in keys if counts[k] > 0}

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

    def maybe_resume(self) -> bool:
        from megatron_elastic.checkpoint import dist as pckpt

        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return False
        state, rng = pckpt.load(latest, model=self.model, optimizer=self.optimizer, groups=self.groups,
                                config=self.cfg.model, router=getattr(self, "router", None))  # fmt: skip
        self.load_extra_checkpoint_state(latest)
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.restore_loader(state)
        ckpt.set_rng_state(rng)
        self._truncate_metrics(self.step)
        self.resumed_from = latest
        return True

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _eval_loss(self, elastic=None) -> float:
        """Mean validation cross-entropy (nats/token) of the model under ``elastic`` masks."""
        self.model.eval()
        total, count = 0.0, 0
        for tokens, labels in self.data.valid_batches(self.cfg.train.eval_batches):
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            if self.groups.pp_size == 1:
                with self._autocast():
                    logits = self.model(tokens, elastic=elastic)
                total += float(self._ce(logits, labels, reduction="sum"))
            else:
                out = []

                def fwd(item, stage, out=out):
                    t, lab = item

                    def loss_func(stage_logits):
                        out.append(float(self._ce(stage_logits, lab, "sum")))
                        return torch.zeros(()), {}

                    return stage(t, elastic=elastic), loss_func

                self._runner(self.model).run(fwd, [(tokens, labels)], seq_length=tokens.shape[1],
                                             micro_batch_size=tokens.shape[0], forward_only=True)  # fmt: skip
                total += out[0] if out else 0.0
            count += labels.numel()
        self.model.train()
        val = total / max(1, count)
        shared = self._share_metrics({"v": val} if self.is_last_stage else None)
        return shared["v"]

    # ------------------------------------------------------------------ helpers for the steps
    def _next_micro_batches(self) -> list:
        return [tuple(t.to(self.device) for t in next(self.data.train_loader)) for _ in range(self.grad_accum)]

    def _global_micro(self, micro: int) -> int:
        return micro * self.groups.dp_size + self.groups.dp_rank


class ParallelTrainer(ParallelMixin, Trainer):
    """Plain pre-training over a TP x PP x DP layout."""

    def __init__(self, cfg, data, *, groups: ParallelGroups):
        self.cfg = cfg  # _parallelize reads it before Trainer.__init__ sets it
        kw = self._setup_parallel(groups, cfg)
        super().__init__(cfg, data, **kw)

    def build_model(self):
        return self._parallelize(super().build_model())

    def evaluate(self) -> float:
        return self._eval_loss(None)

    def train_step(self) -> tuple[float, float, float]:
        tc = self.cfg.train
        lr = lr_at(self.step, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self._next_micro_batches()
        losses: list[float] = []
        if self.groups.pp_size == 1:
            for tokens, labels in batches:
                with self._autocast():
                    logits = self.model(tokens)
                loss = self._ce(logits, labels)
                (loss / self.grad_accum).backward()
                losses.append(float(loss.detach()))
        else:

            def fwd(item, stage):
                tokens, labels = item

                def loss_func(logits):
                    loss = self._ce(logits, labels)
                    losses.append(float(loss.detach()))
                    return loss, {}  # the schedule divides by the number of micro-batches

                with self._autocast():
                    return stage(tokens), loss_func

            self._runner(self.model).run(fwd, batches, seq_length=batches[0][0].shape[1],
                                         micro_batch_size=batches[0][0].shape[0])  # fmt: skip
        self.reduce_gradients()
        grad_norm = self._clip(self._model_params(), tc.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.consumed_samples += tc.global_batch_size
        metrics = self._reduce_sums({"loss": sum(losses)}, {"loss": float(len(losses))}) if self.is_last_stage else None
        metrics = self._share_metrics(metrics)
        return metrics["loss"], grad_norm, lr


class ParallelElasticTrainer(ParallelMixin, ElasticTrainer):
    """Elastic nested distillation over a TP x PP x DP layout (teacher split like the student)."""

    def __init__(self, cfg, data, *, depth_order, parent, groups: ParallelGroups):
        self.cfg = cfg
        kw = self._setup_parallel(groups, cfg)
        self._student = parent
        # ElasticTrainer deep-copies `_parent` into the teacher: give it the plain single-device
        # parent (before TP swaps in modules holding process groups), then parallelize the copy.
        super().__init__(cfg, data, depth_order=depth_order, parent=copy.deepcopy(parent), **kw)
        self.teacher = self._parallelize(self.teacher).to(self.device).eval().requires_grad_(False)
        self._parent = None

    def build_model(self):
        return self._parallelize(self._student)

    def maybe_resume(self) -> bool:
        # ParallelMixin.maybe_resume comes first in the MRO; the router warm-up of a fresh run
        # (ElasticTrainer.maybe_resume) is repeated here on top of it.
        resumed = ParallelMixin.maybe_resume(self)
        if not resumed:
            achieved = self.warm_up_router()
            if achieved:
                self.tracker.message("[elastic] router warm-up: cost of the chosen architecture per budget: "
                                     + ", ".join(f"{k} -> {v:.3f}" for k, v in achieved.items()))  # fmt: skip
        return resumed

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

    # ------------------------------------------------------------------ one routed forward
    def _route(self, micro: int, b_idx: int, tau: float, scale: float):
        from megatron_elastic.elastic.costs import router_loss

        e = self.cfg.elastic
        if self.is_full(b_idx):
            return None, torch.tensor(self.full_cost), torch.zeros(())
        sample = self.router.sample(b_idx, tau=tau, scale=scale, mode=e.mask_mode,
                                    generator=self._noise(self._global_micro(micro), b_idx))  # fmt: skip
        cost = self.cost(sample.probs)
        rl = router_loss(cost, self.budgets[b_idx], self.full_cost, tolerance=e.router_tolerance)
        return sample.state, cost, rl

    def _kd(self, logits, teacher_logits):
        d = self.cfg.distill
        if self.groups.tp_size > 1:
            from megatron_elastic.parallel.losses import vocab_parallel_kl

            return vocab_parallel_kl(logits, teacher_logits, self.groups.tp, temperature=d.temperature)
        from megatron_elastic.distill.losses import forward_kl

        return forward_kl(logits, teacher_logits, temperature=d.temperature, top_k=d.top_k)

    def _teacher_logits(self, batches) -> list:
        """Teacher logits per micro-batch (last stage only under PP), one teacher forward each."""
        self.teacher_forwards += len(batches)
        if self.groups.pp_size == 1:
            with torch.no_grad(), self._autocast():
                return [self.teacher(tokens) for tokens, _ in batches]
        out: list = []

        def fwd(item, stage):
            with torch.no_grad(), self._autocast():
                return stage(item[0]), (lambda logits: (out.append(logits.detach()) or torch.zeros(()), {}))

        self._runner(self.teacher).run(fwd, batches, seq_length=batches[0][0].shape[1],
                                       micro_batch_size=batches[0][0].shape[0], forward_only=True)  # fmt: skip
        return out

    def step_metrics(self) -> dict[str, float]:
        tc, e, d = self.cfg.train, self.cfg.elastic, self.cfg.distill
        self._maybe_enter_stage2()
        lr = self._set_lr()
        tau, scale = self.tau_scale()
        tokens_seen = self.consumed_samples * self.cfg.data.seq_len
        batches = self._next_micro_batches()
        chosen = [self.sampler.sample(self.step, self._global_micro(m), tokens_seen) for m in range(len(batches))]
        teacher = self._teacher_logits(batches)
        keys = ["loss"] + [f"{m}/{budget_tag(b)}" for b in self.budgets for m in ("kd_loss", "ce", "cost", "router_loss")]
        sums, counts = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)

        def record(b_idx, kd, ce, cost, rl, loss):
            tag = budget_tag(self.budgets[b_idx])
            for key, value in ((f"kd_loss/{tag}", kd), (f"ce/{tag}", ce), (f"cost/{tag}", cost / self.full_cost),
                               (f"router_loss/{tag}", rl), ("loss", loss)):  # fmt: skip
                sums[key] += float(value.detach())
                counts[key] += 1

        def objective(m, b_idx, logits, cost, rl):
            _, labels = batches[m]
            kd = self._kd(logits, teacher[m])
            ce = self._ce(logits, labels)
            loss = d.kd_weight * kd + d.ce_weight * ce + e.router_loss_weight * rl
            record(b_idx, kd, ce, cost, rl, loss)
            return loss

        items = [(m, b) for m in range(len(batches)) for b in chosen[m]]
        if self.groups.pp_size == 1:
            for m, b_idx in items:
                state, cost, rl = self._route(m, b_idx, tau, scale)
                with self._autocast():
                    logits = self.model(batches[m][0], elastic=state)
                loss = objective(m, b_idx, logits, cost, rl)
                (loss / len(items)).backward()
        else:

            def fwd(item, stage):
                m, b_idx = item
                state, cost, rl = self._route(m, b_idx, tau, scale)
                with self._autocast():
                    out = stage(batches[m][0], elastic=state)
                return out, (lambda logits: (objective(m, b_idx, logits, cost, rl), {}))

            self._runner(self.model).run(fwd, items, seq_length=batches[0][0].shape[1],
                                         micro_batch_size=batches[0][0].shape[0])  # fmt: skip
        self.reduce_gradients()
        grad_norm = self._clip([p for p in self.model.parameters() if p.grad is not None], tc.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.router.zero_grad(set_to_none=True)
        self.step += 1
        self.consumed_samples += tc.global_batch_size
        metrics = None
        if self.is_last_stage:
            metrics = {"lr": lr, "grad_norm": grad_norm, "tau": tau, "scale": scale, **self._reduce_sums(sums, counts)}
            if hasattr(self, "router_metrics") and (self.step % tc.log_interval == 0 or self.step == tc.max_steps):
                metrics.update(self.router_metrics(tau, scale))
        return self._share_metrics(metrics)

    # ------------------------------------------------------------------ validation and outputs
    @torch.no_grad()
    def evaluate_metrics(self) -> dict[str, float]:
        from megatron_elastic.elastic.space import hard_state

        out = {}
        for b_idx, budget in enumerate(self.budgets):
            arch = self.architecture_for(b_idx)
            state = None if self.is_full(b_idx) else hard_state(self.cfg.model, arch, device=self.device)
            out[f"val_loss/{budget_tag(budget)}"] = self._eval_loss(state)
            out[f"arch_cost/{budget_tag(budget)}"] = self.argmax_cost_fraction(b_idx)
        out["val_loss"] = out[f"val_loss/{budget_tag(self.budgets[0])}"]
        return out

    def on_finished(self) -> None:
        from megatron_elastic.checkpoint.dist import gather_full_model
        from megatron_elastic.elastic import manyinone

        # the single-device parent on the logging rank, None elsewhere
        full = gather_full_model(self.model, self.optimizer, self.groups, self.cfg.model, self.router)
        if full is not None:
            meta = self.elastic_metadata()
            path = manyinone.save(Path(self.cfg.run_dir) / "many-in-one", model=full, router=self.router,
                                  metadata=meta, ranking=self.cfg.elastic.ranking or None)  # fmt: skip
            self.tracker.message(f"[elastic] many-in-one checkpoint: {path}")
            if hasattr(self, "write_reports"):
                self.write_reports(meta)

