"""Run configuration: one dataclass per component, validated once at load.

A YAML recipe has the sections ``model``, ``data``, ``train`` and ``tracking`` (see
``configs/tiny.yaml``). ``model`` may name a ``preset`` and override some of its fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import HybridConfig


def _positive_int(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{section}.{name}={value!r} is invalid; it must be a positive integer")


def _non_negative(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{section}.{name}={value!r} is invalid; it must be a number >= 0")


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from."""

    tokenizer: str = "builtin"
    """Path to a Hugging Face tokenizer.json, or 'builtin' (byte-level BPE trained on the built-in corpus)."""
    tokenizer_vocab_size: int = 512
    """Vocabulary size of the built-in tokenizer (ignored for a tokenizer.json); <= model.vocab_size."""
    train_prefix: str = "builtin"
    """Megatron indexed dataset prefix (PREFIX.bin/.idx) for training, or 'builtin' (built-in corpus)."""
    valid_prefix: str = "builtin"
    """Indexed dataset prefix for validation, or 'builtin' (the built-in corpus's validation split)."""
    seq_len: int = 128
    """Tokens per training sample (samples are packed windows of the concatenated documents)."""
    builtin_max_mb: float = 4.0
    """Cap on each split of the built-in corpus, in MB (the whole standard library is ~9 MB)."""
    cache_dir: str = ""
    """Where the built-in tokenizer and datasets are cached; empty = RUN_DIR/cache."""

    def validate(self) -> None:
        _positive_int("data", self, "tokenizer_vocab_size", "seq_len")
        if not self.builtin_max_mb > 0:
            raise ConfigError(f"data.builtin_max_mb={self.builtin_max_mb!r} is invalid; it must be > 0")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop (Megatron-LM names where it has them)."""

    micro_batch_size: int = 8
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks; a multiple of micro_batch_size x data-parallel size."""
    max_steps: int = 200
    """Optimizer steps to train for."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms, biases, A_log, D, dt_bias)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'."""
    seed: int = 1234
    """Seeds the model init, data order and every random stream."""
    log_interval: int = 10
    """Steps between metric lines."""
    eval_interval: int = 50
    """Steps between validation runs (0 = only at the end)."""
    eval_batches: int = 8
    """Micro-batches per validation run."""
    save_interval: int = 50
    """Steps between checkpoints (0 = only at the end and on a signal)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a successful save."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu' or 'cuda'."""

    def validate(self) -> None:
        _positive_int("train", self, "micro_batch_size", "global_batch_size", "max_steps", "log_interval",
                      "eval_batches", "keep_last")  # fmt: skip
        _non_negative("train", self, "lr", "min_lr", "warmup_steps", "weight_decay", "adam_eps", "clip_grad",
                      "eval_interval", "save_interval")  # fmt: skip
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}; make it one (gradient accumulation steps = ratio)"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}; lower min_lr")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is invalid; it must be in [0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision={self.precision!r} is invalid; use auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.device!r} is invalid; use auto, cpu or cuda")


@dataclass(kw_only=True)
class TrackingConfig:
    """Where metrics go."""

    backends: list[str] = field(default_factory=lambda: ["console"])
    """Any of 'console' (progress bar and metric lines) and 'mlflow'."""
    mlflow_uri: str = ""
    """MLflow tracking URI; empty = a local store inside the run directory (RUN_DIR/mlruns)."""
    experiment: str = "megatron-elastic"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty = the run directory's name."""

    def validate(self) -> None:
        if not isinstance(self.backends, list) or not self.backends:
            raise ConfigError(f"tracking.backends={self.backends!r} is invalid; give a list, e.g. [console, mlflow]")
        for b in self.backends:
            if b not in ("console", "mlflow"):
                raise ConfigError(f"tracking.backends contains {b!r}; use console and/or mlflow")


@dataclass(kw_only=True)
class RunConfig:
    """A whole run: model shape, data, optimisation, tracking and where outputs go."""

    model: HybridConfig
    """The parent model's shape (see megatron_elastic.model.config.HybridConfig)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Tokenizer and datasets."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Metric backends."""
    run_dir: str = "runs/default"
    """Checkpoints, metrics and caches go here; an existing run directory is resumed."""

    def validate(self) -> None:
        self.data.validate()
        self.train.validate()
        self.tracking.validate()
        if self.data.tokenizer == "builtin" and self.data.tokenizer_vocab_size > self.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer_vocab_size={self.data.tokenizer_vocab_size} exceeds model.vocab_size="
                f"{self.model.vocab_size}; lower the tokenizer vocabulary or raise the model's"
            )
        if not self.run_dir:
            raise ConfigError("run_dir is empty; give a directory for checkpoints and metrics")

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "tracking": dataclasses.asdict(self.tracking),
            "run_dir": self.run_dir,
        }
