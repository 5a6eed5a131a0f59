"""Elastic nested distillation: one run trains every budget of the parent.

Per micro-batch: sample budgets (a pure function of seed, step and micro-batch), run the frozen
teacher (the original permuted parent) **once**, then for each budget let the router pick an
architecture (Gumbel-softmax), run the elastic parent under its masks, and backpropagate
KD (+ CE) + lambda * router cost loss. Gradients of all budgets and micro-batches accumulate
before one optimizer step (the router has its own learning rate).

The step itself (sampling, routing, the objective, the metric keys) is
:class:`~megatron_elastic.distill.nested.NestedStep`; which architecture a budget gets is
:class:`~megatron_elastic.elastic.selection.BudgetSelection`. This trainer executes the step one
item after another and loops the budgets for validation; the parallel trainer inherits both.

Outputs beyond the plain trainer's: per-budget metrics (``kd_loss/b0.75``, ``ce/b0.75``,
``cost/b0.75`` = achieved cost / full cost, the chosen sizes), ``tau``, per-budget validation loss
at the router's argmax architecture, and at the end the many-in-one checkpoint
``RUN_DIR/many-in-one`` (parent weights + router + elastic space + every budget's architecture).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_elastic.config import RunConfig
from megatron_elastic.convert.native import NativeTensors
from megatron_elastic.distill.nested import NestedStep, Tally, means
from megatron_elastic.elastic import manyinone
from megatron_elastic.elastic.costs import Cost
from megatron_elastic.elastic.router import Router
from megatron_elastic.elastic.sampler import BudgetSampler
from megatron_elastic.elastic.search_space import ElasticSpace
from megatron_elastic.elastic.selection import BudgetSelection, budget_tag
from megatron_elastic.elastic.space import hard_state
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridLM
from megatron_elastic.model.hybrid import cast_copy
from megatron_elastic.training.trainer import METRICS_FILE, Trainer, build_optimizer


def check_same_space(path: Path, space, budgets: list[float]) -> None:
    """A checkpoint to resume must have been trained with the same elastic space and budgets
    (its ``elastic.json``; a checkpoint without one is not checked here)."""
    meta = path / "elastic.json"
    if not meta.is_file():
        return
    from megatron_elastic.utils.io import read_json

    saved = read_json(meta, "elastic metadata")
    if saved.get("space") != json.loads(json.dumps(space.to_dict())) or saved.get("budgets") != list(budgets):
        raise ConfigError(f"checkpoint {str(path)!r} was trained with another elastic space (choices, budgets or "
                          "depth order differ); resume with the same elastic settings or use a new run_dir")  # fmt: skip


class ElasticTrainer(Trainer):
    def __init__(self, cfg: RunConfig, data, *, depth_order: list[int] | None, parent: HybridLM | None, **kw):
        """``parent``: the model to elastify (the student, trained in place); the teacher is a copy of it
        (:meth:`build_teacher`). None for a subclass whose :meth:`build_model` and :meth:`build_teacher`
        build both (the parallel trainer reads them from the parent's files)."""
        if cfg.elastic is None:
            raise ConfigError("the elastic trainer needs an elastic section in the config")
        self._parent = parent
        e, d = cfg.elastic, cfg.distill
        self.space = ElasticSpace.from_config(cfg.model, e, depth_order)
        self.budgets = list(e.budgets)
        torch.manual_seed(cfg.train.seed)  # the router's initialisation is part of the run's determinism
        self.router = Router(self.space, self.budgets, hidden_size=e.router_hidden)
        super().__init__(cfg, data, **kw)
        self.router.to(self.device)
        # The teacher is the frozen original parent: same weights as the student at step 0.
        self.teacher = self.build_teacher().eval().requires_grad_(False)
        self.teacher_forwards = 0
        self.in_stage2 = False
        self.selection = BudgetSelection(self.space, self.router, Cost.from_config(e, self.space), self.budgets,
                                         tolerance=e.router_tolerance)  # fmt: skip
        self.sampler = BudgetSampler(
            self.budgets, stage1_weights=d.stage1_weights or None, stage2_weights=d.stage2_weights or None,
            full_model_prob=d.full_model_prob, switch_step=d.stage2_start_step or None,
            switch_tokens=d.stage2_start_tokens or None,
            budgets_per_micro_batch=d.budgets_per_micro_batch, seed=cfg.train.seed,
        )  # fmt: skip
        self.nested = NestedStep(self.selection, self.sampler, elastic=e, distill=d, seed=cfg.train.seed,
                                 max_steps=cfg.train.max_steps, **self.nested_losses())  # fmt: skip
        for line in self.space.rounding():  # a fraction that became another size is said once, with the size used
            self.tracker.message(f"[elastic] {line}")

    # ------------------------------------------------------------------ building
    def build_model(self) -> HybridLM:
        return self._parent

    def teacher_dtype(self) -> torch.dtype:
        """The dtype the frozen teacher is held in: bf16 when the weights are (``train.params_dtype``) or the
        run computes in bf16, else fp32; never a full-precision duplicate of the student."""
        bf16 = torch.bfloat16 in (self.params_dtype, self.autocast_dtype)
        return torch.bfloat16 if bf16 else torch.float32

    def build_teacher(self) -> torch.nn.Module:
        """The frozen teacher on the device: the parent's weights at step 0 in :meth:`teacher_dtype`, copied
        tensor by tensor (a bf16 teacher of an fp32 parent never passes through a second fp32 copy)."""
        return cast_copy(self._parent, self.teacher_dtype(), self.device)

    def build_optimizer(self) -> torch.optim.Optimizer:
        opt = build_optimizer(self.model, self.cfg.train)
        opt.add_param_group({"params": list(self.router.parameters()), "weight_decay": 0.0, "is_router": True})
        return opt

    def nested_losses(self) -> dict:
        """The KD / CE functions of the nested step (``{}``: the dense ones of distill.losses)."""
        return {}

    def extra_checkpoint_state(self) -> dict:
        return {"router.pt": self.router.state_dict(),
                "elastic.json": json.dumps(self.selection.metadata(self.cfg.elastic), indent=2)}  # fmt: skip

    def load_extra_checkpoint_state(self, path: Path) -> None:
        if not (path / "router.pt").is_file():
            raise ConfigError(f"checkpoint {str(path)!r} has no router.pt; it is not an elastic checkpoint: use a new run_dir")
        check_same_space(path, self.space, self.budgets)
        self.router.load_state_dict(torch.load(path / "router.pt", map_location="cpu", weights_only=True))

    def maybe_resume(self) -> bool:
        resumed = super().maybe_resume()
        if not resumed:
            achieved = self.selection.warm_up(self.cfg.elastic, seed=self.cfg.train.seed)
            if achieved:
                self.tracker.message("[elastic] router warm-up: cost of the chosen architecture per budget: "
                                     + ", ".join(f"{k} -> {v:.3f}" for k, v in achieved.items()))  # fmt: skip
        return resumed

    # ------------------------------------------------------------------ curriculum
    def stage(self) -> int:
        return self.sampler.stage(self.step, self.consumed_samples * self.cfg.data.seq_len)

    def _stage2_loader(self):
        """Stage 2 reads longer samples (distill.stage2_seq_len) from the same training data."""
        from megatron_elastic.data.loader import PackedDataset, PackedLoader

        tc = self.cfg.train
        ds = PackedDataset(self.data.train_prefix, self.cfg.distill.stage2_seq_len, eod_id=self.data.eod_id)
        return PackedLoader(ds, micro_batch_size=tc.micro_batch_size, global_batch_size=tc.global_batch_size,
                            dp_rank=self.dp_rank, dp_world_size=self.dp_world_size, seed=tc.seed + 1)  # fmt: skip

    def _maybe_enter_stage2(self) -> None:
        if self.in_stage2 or self.stage() != 2:
            return
        self.in_stage2 = True
        if self.cfg.distill.stage2_seq_len and self.cfg.distill.stage2_seq_len != self.cfg.data.seq_len:
            self.data.train_loader = self._stage2_loader()
            self.tracker.message(f"[elastic] stage 2 at step {self.step}: sequence length "
                                 f"{self.cfg.distill.stage2_seq_len}, budget weights {self.cfg.distill.stage2_weights}")  # fmt: skip
        else:
            self.tracker.message(f"[elastic] stage 2 at step {self.step}: budget weights {self.cfg.distill.stage2_weights}")

    def extra_trainer_state(self) -> dict:
        return {"stage": 2 if self.in_stage2 else 1}

    def restore_loader(self, trainer_state: dict) -> None:
        if trainer_state.get("stage") == 2:
            self.in_stage2 = True
            if self.cfg.distill.stage2_seq_len and self.cfg.distill.stage2_seq_len != self.cfg.data.seq_len:
                self.data.train_loader = self._stage2_loader()
        self.data.train_loader.load_state_dict(trainer_state["loader"])

    # ------------------------------------------------------------------ the nested step
    def global_micro(self, micro: int) -> int:
        """The micro-batch's index over all data-parallel ranks (budgets and noise are keyed by it)."""
        return micro * self.dp_world_size + self.dp_rank

    def nested_forward_backward(self, tau: float, scale: float, tally: Tally) -> None:
        """Every (micro-batch, budget) item of the step, one after another: the teacher once per
        micro-batch, its logits dropped once the micro-batch's budgets are done."""
        tokens_seen = self.consumed_samples * self.cfg.data.seq_len
        for micro in range(self.grad_accum):
            tokens, labels = next(self.data.train_loader)
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            g = self.global_micro(micro)
            chosen = self.nested.budgets_of(self.step, g, tokens_seen)
            with torch.no_grad(), self._autocast():
                teacher_logits = self.teacher(tokens)
            self.teacher_forwards += 1
            for b_idx in chosen:
                state, cost, rl = self.nested.route(self.step, g, b_idx, tau, scale)
                with self._autocast():
                    logits = self.model(tokens, elastic=state)
                loss = self.nested.objective(logits, teacher_logits, labels, b_idx, cost, rl, tally)
                (loss / (self.grad_accum * len(chosen))).backward()
            del teacher_logits

    def reduce_means(self, tally: Tally) -> dict[str, float]:
        """Per-key means of the step's tally (over data-parallel ranks in a parallel run)."""
        return means(tally.sums, tally.counts)

    def step_metrics(self) -> dict[str, float]:
        tc = self.cfg.train
        self._maybe_enter_stage2()
        lr = self.set_lr()
        tau, scale = self.nested.schedules(self.step)
        tally = self.nested.tally()
        self.nested_forward_backward(tau, scale, tally)
        self.reduce_gradients()
        grad_norm = self.clip_gradients(self.model.parameters())
        self.optimizer_step()
        self.router.zero_grad(set_to_none=True)
        metrics = self.nested.metrics(self.reduce_means(tally), lr=lr, grad_norm=grad_norm, tau=tau, scale=scale)
        if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
            metrics.update(self.selection.router_metrics(tau, scale))
        return metrics

    def flops_per_token(self) -> float:
        """Per training token: the teacher's forward pass plus forward + backward of the parent for
        every budget of the micro-batch (masks do not shrink the matmuls that run)."""
        from megatron_elastic.tracking.perf import forward_flops_per_token

        n = self.cfg.distill.budgets_per_micro_batch or len(self.budgets)
        return forward_flops_per_token(self.cfg.model, self.cfg.data.seq_len) * (1 + 3 * n)

    # ------------------------------------------------------------------ validation
    def evaluate_metrics(self) -> dict[str, float]:
        """Validation loss of every budget at its resolved architecture."""
        sel, out = self.selection, {}
        for b_idx, budget in enumerate(self.budgets):
            state = None if sel.is_full(b_idx) else hard_state(self.cfg.model, sel.architecture_for(b_idx),
                                                               device=self.device)  # fmt: skip
            out[f"val_loss/{budget_tag(budget)}"] = self.evaluate_loss(state)
            out[f"arch_cost/{budget_tag(budget)}"] = sel.argmax_cost_fraction(b_idx)
        out["val_loss"] = out[f"val_loss/{budget_tag(self.budgets[0])}"]
        return out

    # ------------------------------------------------------------------ outputs
    def export_model(self) -> HybridLM | NativeTensors | None:
        """The single-device parent to write into the many-in-one checkpoint on this rank (None: not
        here): the model, or its tensors as a stream (a sharded parallel run)."""
        return self.model if self.dp_rank == 0 else None

    def on_finished(self) -> None:
        full = self.export_model()
        if full is None:
            return
        meta = self.selection.metadata(self.cfg.elastic)
        path = manyinone.save(Path(self.cfg.run_dir) / "many-in-one", model=full, router=self.router,
                              metadata=meta, ranking=self.cfg.elastic.ranking or None)  # fmt: skip
        self.tracker.message(f"[elastic] many-in-one checkpoint: {path}")
        self.write_reports(meta)

    def write_reports(self, meta: dict) -> None:
        """Per-budget architectures, the extraction report and the plots (RUN_DIR/reports), handed
        to the trackers as artifacts. A report that fails is reported; the run still succeeds."""
        from megatron_elastic.tracking.reports import write_elastic_reports

        try:
            lines = (Path(self.cfg.run_dir) / METRICS_FILE).read_text().splitlines()
            records = [json.loads(x) for x in lines if x.strip().endswith("}")]
            files = write_elastic_reports(Path(self.cfg.run_dir), self.cfg.model, meta, records, log=self.tracker.message)
        except Exception as exc:  # noqa: BLE001 - reports are a by-product; the checkpoint is written
            self.tracker.message(f"[elastic] reports failed ({type(exc).__name__}: {exc})")
            return
        self.tracker.message(f"[elastic] reports (architectures, extraction report, plots): {Path(self.cfg.run_dir) / 'reports'}")
        self.tracker.log_artifact(Path(self.cfg.run_dir) / "many-in-one" / "elastic.json", "many-in-one")
        for path, folder in files:
            self.tracker.log_artifact(path, folder)
