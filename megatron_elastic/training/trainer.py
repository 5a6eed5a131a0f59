"""The training loop: AdamW, warmup + cosine LR, gradient accumulation and clipping, periodic
validation and checkpoints, exact resume, graceful stop on signals.

Single process today. The pieces a distributed run changes are isolated: the data loader takes a
data-parallel rank and world size, gradients pass through :meth:`Trainer.reduce_gradients`, and only
rank 0 writes checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_elastic.checkpoint import dist as dist_ckpt
from megatron_elastic.checkpoint import native as ckpt
from megatron_elastic.config import RunConfig, dump_config
from megatron_elastic.distill.losses import cross_entropy
from megatron_elastic.model import HybridLM
from megatron_elastic.model.hybrid import set_recompute
from megatron_elastic.model.moe import set_moe_balancing, update_expert_bias
from megatron_elastic.model.params import NO_DECAY
from megatron_elastic.tracking import MultiTracker, build_trackers
from megatron_elastic.training.schedule import lr_at
from megatron_elastic.training.signals import EXIT_REQUEUE, StopFlag

METRICS_FILE = "metrics.jsonl"
# Parameters that get no weight decay: gains, biases and the SSM's per-head scalars.


@dataclass
class TrainResult:
    exit_code: int
    step: int
    last_loss: float | None
    val_loss: float | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from megatron_elastic.errors import ConfigError

        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def resolve_params_dtype(name: str, device: torch.device) -> torch.dtype:
    """``train.params_dtype`` on ``device``: 'auto' is bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the per-parameter loop gives bit-identical results across runs and resumes.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=False)  # fmt: skip


class Trainer:
    def __init__(self, cfg: RunConfig, data, *, tracker: MultiTracker | None = None,
                 dp_rank: int = 0, dp_world_size: int = 1):  # fmt: skip
        """``data`` provides ``train_loader`` (an iterator of micro-batches with state_dict/load_state_dict),
        ``valid_batches(n)`` (an iterable of the first n validation micro-batches) and
        ``unigram_baseline`` (nats/token, or None)."""
        self.cfg = cfg
        self.data = data
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.device = resolve_device(cfg.train.device)
        tc = cfg.train
        self.grad_accum = tc.global_batch_size // (tc.micro_batch_size * dp_world_size)
        self.params_dtype = resolve_params_dtype(tc.params_dtype, self.device)
        self.check_precision()
        torch.manual_seed(tc.seed)
        self.model = self.build_model().to(self.device)
        set_recompute(self.model, tc.recompute)  # after build_model: on the parallel blocks too
        set_moe_balancing(self.model, tc.moe_aux_loss_coeff, self.grad_accum)
        self.optimizer = self.build_optimizer()
        self.tracker = tracker if tracker is not None else build_trackers(cfg)
        use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.step = 0
        self.consumed_samples = 0
        self.resumed_from: Path | None = None
        self.last_val_loss: float | None = None

    # ------------------------------------------------------------------ overridable pieces
    def check_precision(self) -> None:
        """This trainer trains float32 weights with torch's AdamW; bfloat16 weights and the distributed
        optimizer are megatron-core's, which the parallel trainer runs (launch/train.py, any world size)."""
        if self.params_dtype != torch.float32 or self.cfg.parallel.distributed_optimizer:
            from megatron_elastic.errors import ConfigError

            what = ("parallel.distributed_optimizer=true" if self.cfg.parallel.distributed_optimizer
                    else f"train.params_dtype={self.cfg.train.params_dtype} (bfloat16 weights here)")  # fmt: skip
            raise ConfigError(f"{what} needs megatron-core's optimizer in the parallel trainer: run it with "
                              "launch/train.py (torchrun, also for one process), or set train.params_dtype=float32 "
                              "and parallel.distributed_optimizer=false")  # fmt: skip

    def build_model(self) -> HybridLM:
        return HybridLM(self.cfg.model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.cfg.train)

    def extra_checkpoint_state(self) -> dict:
        """Additional objects saved with torch.save into the checkpoint (name -> object)."""
        return {}

    def load_extra_checkpoint_state(self, path: Path) -> None:
        pass

    def restore_loader(self, trainer_state: dict) -> None:
        self.data.train_loader.load_state_dict(trainer_state["loader"])

    def extra_trainer_state(self) -> dict:
        """Small JSON-safe additions to trainer_state.json."""
        return {}

    def load_checkpoint(self, path: Path) -> tuple[dict, dict]:
        """Load ``path`` into the model and optimizer; returns (trainer state, RNG state)."""
        return dist_ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer)

    # ------------------------------------------------------------------ resume
    def maybe_resume(self) -> bool:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:  # a fresh start: records of an attempt killed before its first checkpoint go
            self._truncate_metrics(0)
            return False
        state, rng = self.load_checkpoint(latest)
        self.load_extra_checkpoint_state(latest)
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.restore_loader(state)
        ckpt.set_rng_state(rng)
        self._truncate_metrics(self.step)
        if self.dp_rank == 0:  # a save killed between moving `latest` and pruning left one too many
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last, resumed=latest)
        self.resumed_from = latest
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric records written after the checkpoint we resume from (they will be redone)."""
        path = self.run_dir / METRICS_FILE
        if not path.exists() or self.dp_rank != 0:
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(path)

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def reduce_gradients(self) -> None:
        """Average gradients over data-parallel ranks (identity in a single process)."""

    def _write_metrics(self, record: dict) -> None:
        if self.dp_rank != 0:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self) -> Path | None:
        if self.dp_rank != 0:
            return None
        state = {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "loader": self.data.train_loader.state_dict(),
            **self.extra_trainer_state(),
        }
        return ckpt.save_checkpoint(self.ckpt_root, step=self.step, model=self.model, optimizer=self.optimizer,
                                    trainer_state=state, config_yaml=dump_config(self.cfg),
                                    keep_last=self.cfg.train.keep_last, extra=self.extra_checkpoint_state())  # fmt: skip

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of this trainer's logits (the parallel trainer's are vocab-sharded under TP)."""
        return cross_entropy(logits, labels, reduction=reduction)

    def eval_loss_sum(self, tokens: torch.Tensor, labels: torch.Tensor, elastic) -> float:
        """Summed validation cross-entropy of one batch under ``elastic`` masks (None = the whole model)."""
        with self._autocast():
            logits = self.model(tokens, elastic=elastic)
        return float(self.lm_loss(logits, labels, reduction="sum"))

    @torch.no_grad()
    def evaluate_loss(self, elastic=None) -> float:
        """Mean validation cross-entropy (nats/token) of the model under ``elastic`` masks."""
        self.model.eval()
        total, count = 0.0, 0
        for tokens, labels in self.data.valid_batches(self.cfg.train.eval_batches):
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            total += self.eval_loss_sum(tokens, labels, elastic)
            count += labels.numel()
        self.model.train()
        return total / max(1, count)

    def evaluate(self) -> float:
        return self.evaluate_loss(None)

    def evaluate_metrics(self) -> dict[str, float]:
        """Validation metrics; ``val_loss`` is the headline number."""
        return {"val_loss": self.evaluate()}

    def flops_per_token(self) -> float:
        """Model FLOPs of one training token (forward + backward = 3x forward)."""
        from megatron_elastic.tracking.perf import forward_flops_per_token

        return 3 * forward_flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    def throughput_metrics(self, tokens_per_s: float) -> dict[str, float]:
        """Achieved TFLOP/s, the MFU estimate and memory, logged with tokens_per_s (tracker only)."""
        from megatron_elastic.tracking.perf import throughput_metrics

        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return throughput_metrics(tokens_per_s, self.flops_per_token(), device=self.device, num_devices=world,
                                  configured_tflops=self.cfg.tracking.peak_tflops)  # fmt: skip

    def step_metrics(self) -> dict[str, float]:
        """One optimizer step; returns at least loss, grad_norm and lr."""
        loss, grad_norm, lr = self.train_step()
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def set_lr(self) -> float:
        """Set this step's learning rate on every parameter group (the router's, flagged ``is_router``,
        times ``elastic.router_lr_multiplier``); returns the base rate."""
        tc = self.cfg.train
        lr = lr_at(self.step, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * (self.cfg.elastic.router_lr_multiplier if group.get("is_router") else 1.0)
        return lr

    def clip_gradients(self, params) -> float:
        """Clip to ``train.clip_grad`` (0 = no clipping); returns the gradient norm before clipping."""
        params = [p for p in params if p.grad is not None]
        max_norm = self.cfg.train.clip_grad
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients (and the MoE routers' balancing step) and count the step."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_expert_bias(self.model, self.cfg.train.moe_bias_update_rate)
        self.step += 1
        self.consumed_samples += self.cfg.train.global_batch_size

    def forward_backward(self) -> float:
        """Forward and backward over grad_accum micro-batches; returns the mean loss."""
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum):
            tokens, labels = next(self.data.train_loader)
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            with self._autocast():
                logits = self.model(tokens)
            loss = self.lm_loss(logits, labels)
            (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        return (loss_sum / self.grad_accum).item()

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches. Returns (loss, grad_norm, lr)."""
        lr = self.set_lr()
        loss = self.forward_backward()
        self.reduce_gradients()
        grad_norm = self.clip_gradients(self.model.parameters())
        self.optimizer_step()
        return loss, grad_norm, lr

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        tc = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        config_path = self.run_dir / "config.yaml"
        config_path.write_text(dump_config(self.cfg))
        self.tracker.start(run_dir=self.run_dir, config=self.cfg.to_dict(), resumed=resumed,
                           total_steps=tc.max_steps, start_step=self.step)  # fmt: skip
        if not resumed:
            self.tracker.log_artifact(config_path)
        baseline = self.data.unigram_baseline
        if baseline is not None and not resumed:
            self.tracker.message(f"[data] unigram baseline (context-free model) = {baseline:.4f} nats/token")
        stop = StopFlag().install()
        self.model.train()
        last_loss = None
        tokens_per_step = tc.global_batch_size * self.cfg.data.seq_len
        t_last, steps_since = time.perf_counter(), 0
        try:
            while self.step < tc.max_steps:
                metrics = self.step_metrics()
                loss = metrics["loss"]
                last_loss = loss
                steps_since += 1
                if not math.isfinite(loss):
                    self.tracker.message(f"[train] loss became {loss} at step {self.step}; stopping")
                    self.tracker.finish("FAILED")
                    return TrainResult(1, self.step, loss, self.last_val_loss)
                record = {"step": self.step, **metrics}
                self._write_metrics(record)
                if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                    now = time.perf_counter()
                    record["tokens_per_s"] = tokens_per_step * steps_since / max(now - t_last, 1e-9)
                    record.update(self.throughput_metrics(record["tokens_per_s"]))
                    t_last, steps_since = now, 0
                    self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, self.step)
                if (tc.eval_interval and self.step % tc.eval_interval == 0) or self.step == tc.max_steps:
                    val = {"step": self.step, **self.evaluate_metrics()}
                    self.last_val_loss = val["val_loss"]
                    if baseline is not None:
                        val["val_unigram_baseline"] = baseline
                    self._write_metrics(val)
                    self.tracker.log_metrics({k: v for k, v in val.items() if k != "step"}, self.step)
                if (tc.save_interval and self.step % tc.save_interval == 0) or self.step == tc.max_steps:
                    self.save()
                if self.step < tc.max_steps and self.stop_requested(stop):  # after the last step: finish
                    path = self.save()
                    self.tracker.message(f"[train] signal {stop.signum}: checkpointed step {self.step} to "
                                         f"{path}; exiting with code {EXIT_REQUEUE} (resume by re-running)")  # fmt: skip
                    self.tracker.finish("KILLED")
                    return TrainResult(EXIT_REQUEUE, self.step, last_loss, self.last_val_loss)
        finally:
            stop.uninstall()
        self.on_finished()
        self.tracker.finish("FINISHED")
        return TrainResult(0, self.step, last_loss, self.last_val_loss)

    def stop_requested(self, stop: StopFlag) -> bool:
        """Whether to checkpoint and exit now (a distributed run makes every rank agree)."""
        return stop.requested

    def on_finished(self) -> None:
        """Called once after the last step (the elastic trainer writes its many-in-one checkpoint)."""
