"""Elastic nested distillation: one run trains every budget of the parent.

Per micro-batch: sample budgets (a pure function of seed, step and micro-batch), run the frozen
teacher (the original permuted parent) **once**, then for each budget let the router pick an
architecture (Gumbel-softmax), run the elastic parent under its masks, and backpropagate
KD (+ CE) + lambda * router cost loss. Gradients of all budgets and micro-batches accumulate
before one optimizer step (the router has its own learning rate).

Outputs beyond the plain trainer's: per-budget metrics (``kd_loss/b0.75``, ``ce/b0.75``,
``cost/b0.75`` = achieved cost / full cost, the chosen sizes), ``tau``, per-budget validation loss
at the router's argmax architecture, and at the end the many-in-one checkpoint
``RUN_DIR/many-in-one`` (parent weights + router + elastic space + every budget's architecture).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_elastic.config import RunConfig
from megatron_elastic.distill.losses import cross_entropy, forward_kl
from megatron_elastic.elastic import manyinone
from megatron_elastic.elastic.costs import Cost, one_hot, router_loss
from megatron_elastic.elastic.router import Router, scale_at, tau_at
from megatron_elastic.elastic.sampler import BudgetSampler
from megatron_elastic.elastic.space import full_architecture, hard_state
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridLM
from megatron_elastic.training.trainer import Trainer, build_optimizer


def budget_tag(b: float) -> str:
    return f"b{b:.2f}"


def build_space(cfg: RunConfig, depth_order: list[int] | None):
    from megatron_elastic.elastic.search_space import ElasticSpace

    e = cfg.elastic
    return ElasticSpace(cfg.model, hidden=e.hidden, ffn=e.ffn, attn_heads=e.attn_heads, mamba_heads=e.mamba_heads,
                        mamba_head_dim=e.mamba_head_dim, depth=e.depth, depth_order=depth_order,
                        heterogeneous=e.heterogeneous, multiple_of=e.multiple_of,
                        protect_attention=e.protect_attention)  # fmt: skip


def build_cost(cfg: RunConfig, space) -> Cost:
    e = cfg.elastic
    table = json.loads(Path(e.latency_table).read_text()) if e.latency_table else None
    return Cost(space, e.cost, bytes_per_param=e.memory_bytes_per_param, batch=e.memory_batch,
                context=e.memory_context, table=table)  # fmt: skip


def check_budgets_reachable(cfg: RunConfig, space) -> None:
    """Every budget must lie between the smallest and the largest architecture of the space."""
    cost = build_cost(cfg, space)
    last = {a: len(space.choices(a)) - 1 for a in space.axes}
    smallest = {a: [i] * len(space.layer_indices(a)) if space.is_per_layer(a) else i for a, i in last.items()}
    low = float(cost(one_hot(space, smallest, torch.float64))) / cost.full
    tol = cfg.elastic.router_tolerance
    for b in cfg.elastic.budgets:
        if b < low * (1 - tol):
            raise ConfigError(
                f"elastic.budgets: {b} is out of reach: the smallest architecture of the space costs {low:.3f} of the "
                f"parent ({cfg.elastic.cost}); add smaller choices (e.g. to elastic.ffn / elastic.depth) or raise the budget"
            )


def check_same_space(path: Path, space, budgets: list[float]) -> None:
    """A checkpoint to resume must have been trained with the same elastic space and budgets
    (its ``elastic.json``; a checkpoint without one is not checked here)."""
    meta = path / "elastic.json"
    if not meta.is_file():
        return
    saved = json.loads(meta.read_text())
    if saved.get("space") != json.loads(json.dumps(space.to_dict())) or saved.get("budgets") != list(budgets):
        raise ConfigError(f"checkpoint {str(path)!r} was trained with another elastic space (choices, budgets or "
                          "depth order differ); resume with the same elastic settings or use a new run_dir")  # fmt: skip


class ElasticTrainer(Trainer):
    def __init__(self, cfg: RunConfig, data, *, depth_order: list[int] | None, parent: HybridLM, **kw):
        if cfg.elastic is None:
            raise ConfigError("the elastic trainer needs an elastic section in the config")
        self._parent = parent
        self.space = build_space(cfg, depth_order)
        self.budgets = list(cfg.elastic.budgets)
        torch.manual_seed(cfg.train.seed)  # the router's initialisation is part of the run's determinism
        self.router = Router(self.space, self.budgets, hidden_size=cfg.elastic.router_hidden)
        super().__init__(cfg, data, **kw)
        self.router.to(self.device)
        # The teacher is the frozen original parent: same weights as the student at step 0.
        self.teacher = copy.deepcopy(self._parent).to(self.device).eval().requires_grad_(False)
        self.teacher_forwards = 0
        self.in_stage2 = False
        d = cfg.distill
        self.cost = build_cost(cfg, self.space)
        self.full_cost = float(self.cost.full)
        self.sampler = BudgetSampler(
            self.budgets, stage1_weights=d.stage1_weights or None, stage2_weights=d.stage2_weights or None,
            full_model_prob=d.full_model_prob, switch_step=d.stage2_start_step or None,
            switch_tokens=d.stage2_start_tokens or None,
            budgets_per_micro_batch=d.budgets_per_micro_batch, seed=cfg.train.seed,
        )  # fmt: skip

    # ------------------------------------------------------------------ building
    def build_model(self) -> HybridLM:
        return self._parent

    def build_optimizer(self) -> torch.optim.Optimizer:
        opt = build_optimizer(self.model, self.cfg.train)
        opt.add_param_group({"params": list(self.router.parameters()), "weight_decay": 0.0, "is_router": True})
        return opt

    def extra_checkpoint_state(self) -> dict:
        return {"router.pt": self.router.state_dict(), "elastic.json": json.dumps(self.elastic_metadata(), indent=2)}

    def load_extra_checkpoint_state(self, path: Path) -> None:
        if not (path / "router.pt").is_file():
            raise ConfigError(f"checkpoint {str(path)!r} has no router.pt; it is not an elastic checkpoint: use a new run_dir")
        check_same_space(path, self.space, self.budgets)
        self.router.load_state_dict(torch.load(path / "router.pt", map_location="cpu", weights_only=True))

    def is_full(self, budget_index: int) -> bool:
        """Budget 1.0 is the parent itself: never routed, never masked (as the paper's 12B)."""
        return self.budgets[budget_index] == 1.0

    def architecture_for(self, budget_index: int):
        if self.is_full(budget_index):
            return full_architecture(self.cfg.model)
        return self.space.architecture(self.choice_for(budget_index))

    @torch.no_grad()
    def choice_for(self, budget_index: int) -> dict:
        """The router's most likely choice *that meets the budget* (within the tolerance).

        The plain argmax usually does; when it does not (the task loss pulled it across the band's
        edge), the homogeneous choices of the space are scored by the router's log-probability and
        the most likely feasible one wins, so an extracted child always honours its budget."""
        argmax = self.router.argmax_indices(budget_index)
        target, tol = self.budgets[budget_index], self.cfg.elastic.router_tolerance
        if abs(self._fraction(argmax) / target - 1) <= tol:
            return argmax
        logits = self.router.logits(budget_index)
        logp = {a: torch.log_softmax(z, dim=-1) for a, z in logits.items()}
        axes = list(logp)
        best, best_score, closest, closest_gap = None, -float("inf"), argmax, float("inf")
        for combo in itertools.product(*(range(len(self.space.choices(a))) for a in axes)):
            indices = {a: ([i] * len(self.space.layer_indices(a)) if self.space.is_per_layer(a) else i)
                       for a, i in zip(axes, combo)}  # fmt: skip
            gap = abs(self._fraction(indices) / target - 1)
            if gap < closest_gap:
                closest, closest_gap = indices, gap
            if gap <= tol:
                score = sum(float(logp[a][..., i].sum()) for a, i in zip(axes, combo))
                if score > best_score:
                    best, best_score = indices, score
        return best if best is not None else closest

    def _fraction(self, indices: dict) -> float:
        return float(self.cost(one_hot(self.space, indices, device=self.device))) / self.full_cost

    @torch.no_grad()
    def argmax_cost_fraction(self, budget_index: int) -> float:
        """Cost of the budget's resolved architecture, as a fraction of the parent's."""
        if self.is_full(budget_index):
            return 1.0
        return self._fraction(self.choice_for(budget_index))

    def elastic_metadata(self) -> dict:
        return manyinone.metadata(self.space, self.budgets, self.architecture_for,
                                  cost_fraction=self.argmax_cost_fraction, cfg=self.cfg.elastic)  # fmt: skip

    # ------------------------------------------------------------------ router warm-up
    def warm_up_router(self) -> dict[str, float]:
        """Fit the router to the budgets on the cost loss alone (cheap: no data, no model forward).

        Deterministic (fixed noise seed), so a fresh run and its resumed continuation agree."""
        e = self.cfg.elastic
        steps = e.router_warmup_steps
        if steps == 0:
            return {}
        opt = torch.optim.Adam(self.router.parameters(), lr=e.router_warmup_lr)
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 17)
        for s in range(steps):
            tau = tau_at(s, steps, start=e.tau_start, end=max(e.tau_end, 0.1), kind=e.tau_schedule)
            scale = scale_at(s, steps, start=e.scale_start, end=e.scale_end)
            loss = sum(router_loss(self.cost(self.router.sample(b, tau=tau, scale=scale, mode="soft", generator=gen).probs),
                                   budget, self.full_cost, tolerance=e.router_tolerance / 2)
                       for b, budget in enumerate(self.budgets) if not self.is_full(b))  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.router.zero_grad(set_to_none=True)
        return {budget_tag(b): self.argmax_cost_fraction(i) for i, b in enumerate(self.budgets)}

    def maybe_resume(self) -> bool:
        resumed = super().maybe_resume()
        if not resumed:
            achieved = self.warm_up_router()
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

    # ------------------------------------------------------------------ schedules
    def tau_scale(self) -> tuple[float, float]:
        e, total = self.cfg.elastic, self.cfg.train.max_steps
        tau = tau_at(self.step, total, start=e.tau_start, end=e.tau_end, kind=e.tau_schedule)
        return tau, scale_at(self.step, total, start=e.scale_start, end=e.scale_end)

    def _noise(self, micro: int, budget_index: int) -> torch.Generator:
        # Gumbel noise depends only on (seed, step, micro-batch, budget): identical after a resume
        # and on every rank of one model replica.
        g = torch.Generator()
        g.manual_seed((self.cfg.train.seed * 1_000_003 + self.step * 1009 + micro * 31 + budget_index) % (2**63))
        return g

    # ------------------------------------------------------------------ the nested step
    def step_metrics(self) -> dict[str, float]:
        tc, e, d = self.cfg.train, self.cfg.elastic, self.cfg.distill
        self._maybe_enter_stage2()
        lr = self._set_lr()
        tau, scale = self.tau_scale()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        total_loss = 0.0
        n_terms = 0
        tokens_seen = self.consumed_samples * self.cfg.data.seq_len
        for micro in range(self.grad_accum):
            tokens, labels = next(self.data.train_loader)
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            chosen = self.sampler.sample(self.step, micro, tokens_seen)
            with torch.no_grad(), self._autocast():
                teacher_logits = self.teacher(tokens)
            self.teacher_forwards += 1
            for b_idx in chosen:
                tag = budget_tag(self.budgets[b_idx])
                if self.is_full(b_idx):  # the parent itself: no masks, no routing
                    state, cost, rl = None, torch.tensor(self.full_cost), torch.zeros(())
                else:
                    sample = self.router.sample(b_idx, tau=tau, scale=scale, mode=e.mask_mode,
                                                generator=self._noise(micro, b_idx))  # fmt: skip
                    state = sample.state
                    cost = self.cost(sample.probs)
                    rl = router_loss(cost, self.budgets[b_idx], self.full_cost, tolerance=e.router_tolerance)
                with self._autocast():
                    logits = self.model(tokens, elastic=state)
                kd = forward_kl(logits, teacher_logits, temperature=d.temperature, top_k=d.top_k)
                ce = cross_entropy(logits, labels)
                loss = d.kd_weight * kd + d.ce_weight * ce + e.router_loss_weight * rl
                (loss / (self.grad_accum * len(chosen))).backward()
                for key, value in ((f"kd_loss/{tag}", kd), (f"ce/{tag}", ce), (f"cost/{tag}", cost / self.full_cost),
                                   (f"router_loss/{tag}", rl)):  # fmt: skip
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                    counts[key] = counts.get(key, 0) + 1
                total_loss += float(loss.detach())
                n_terms += 1
        model_params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(model_params, tc.clip_grad) if tc.clip_grad > 0 else \
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model_params]))  # fmt: skip
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.router.zero_grad(set_to_none=True)
        self.step += 1
        self.consumed_samples += tc.global_batch_size
        metrics = {"loss": total_loss / max(1, n_terms), "lr": lr, "grad_norm": float(grad_norm), "tau": tau,
                   "scale": scale}  # fmt: skip
        metrics.update({k: v / counts[k] for k, v in sums.items()})
        if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
            metrics.update(self.router_metrics(tau, scale))
        return metrics

    @torch.no_grad()
    def router_metrics(self, tau: float, scale: float) -> dict[str, float]:
        """What the router prefers per routed budget, noise-free at this step's tau and scale:
        ``router/b0.50/ffn/192`` = probability of FFN size 192 (mean over layers in a heterogeneous
        space), ``arch/b0.50/ffn`` = the argmax size, ``arch/b0.50/layers`` = layers kept and
        ``arch/b0.50/cost`` = the argmax architecture's cost / the parent's."""
        out: dict[str, float] = {}
        for b_idx, budget in enumerate(self.budgets):
            if self.is_full(b_idx):
                continue
            tag = budget_tag(budget)
            for axis, z in self.router.logits(b_idx).items():
                probs = torch.softmax(scale * z.float() / tau, dim=-1).reshape(-1, z.shape[-1]).mean(0)
                for size, p in zip(self.space.choices(axis), probs.tolist()):
                    out[f"router/{tag}/{axis}/{size}"] = p
            indices = self.router.argmax_indices(b_idx)
            for axis in self.router.heads:
                picked = [self.space.choices(axis)[i] for i in (indices[axis] if self.space.is_per_layer(axis)
                                                                 else [indices[axis]])]  # fmt: skip
                out[f"arch/{tag}/{axis if axis != 'depth' else 'layers'}"] = sum(picked) / len(picked)
            out[f"arch/{tag}/cost"] = self._fraction(indices)
        return out

    def flops_per_token(self) -> float:
        """Per training token: the teacher's forward pass plus forward + backward of the parent for
        every budget of the micro-batch (masks do not shrink the matmuls that run)."""
        from megatron_elastic.tracking.perf import forward_flops_per_token

        n = self.cfg.distill.budgets_per_micro_batch or len(self.budgets)
        return forward_flops_per_token(self.cfg.model, self.cfg.data.seq_len) * (1 + 3 * n)

    def _set_lr(self) -> float:
        from megatron_elastic.training.schedule import lr_at

        tc = self.cfg.train
        lr = lr_at(self.step, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * (self.cfg.elastic.router_lr_multiplier if group.get("is_router") else 1.0)
        return lr

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate_metrics(self) -> dict[str, float]:
        """Validation loss of every budget at the router's argmax architecture."""
        self.model.eval()
        out = {}
        for b_idx, budget in enumerate(self.budgets):
            arch = self.architecture_for(b_idx)
            state = None if self.is_full(b_idx) else hard_state(self.cfg.model, arch, device=self.device)
            total, count = 0.0, 0
            for tokens, labels in self.data.valid_batches(self.cfg.train.eval_batches):
                tokens, labels = tokens.to(self.device), labels.to(self.device)
                with self._autocast():
                    logits = self.model(tokens, elastic=state)
                total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").item()
                count += labels.numel()
            out[f"val_loss/{budget_tag(budget)}"] = total / max(1, count)
            out[f"arch_cost/{budget_tag(budget)}"] = self.argmax_cost_fraction(b_idx)
        self.model.train()
        out["val_loss"] = out[f"val_loss/{budget_tag(self.budgets[0])}"]
        return out

    def on_finished(self) -> None:
        if self.dp_rank == 0:
            meta = self.elastic_metadata()
            path = manyinone.save(Path(self.cfg.run_dir) / "many-in-one", model=self.model, router=self.router,
                                  metadata=meta, ranking=self.cfg.elastic.ranking or None)  # fmt: skip
            self.tracker.message(f"[elastic] many-in-one checkpoint: {path}")
            self.write_reports(meta)

    def write_reports(self, meta: dict) -> None:
        """Per-budget architectures, the extraction report and the plots (RUN_DIR/reports), handed
        to the trackers as artifacts. A report that fails is reported; the run still succeeds."""
        from megatron_elastic.tracking.reports import write_elastic_reports
        from megatron_elastic.training.trainer import METRICS_FILE

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
