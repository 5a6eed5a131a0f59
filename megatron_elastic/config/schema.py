"""Run configuration: one dataclass per component, validated once at load.

A YAML recipe has the sections ``model``, ``data``, ``train`` and ``tracking`` (see
``configs/tiny.yaml``). ``model`` may name a ``preset`` and override some of its fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import RECOMPUTE_MODES, HybridConfig

PARAMS_DTYPES = ("float32", "bfloat16", "auto")


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
    params_dtype: str = "float32"
    """The model weights' dtype: 'float32', 'bfloat16' or 'auto' (bfloat16 on CUDA, float32 on CPU). bfloat16
    weights train as Megatron does: megatron-core's mixed-precision optimizer keeps fp32 main weights and
    Adam moments, its DDP wrapper accumulates gradients in fp32 (the parallel launcher, launch/train.py)."""
    recompute: str = "none"
    """Activation recomputation in backward: 'none'; 'selective' (the Mamba conv + scan + gated norm, the
    attention core and the squared ReLU are recomputed from their inputs: the large, cheap parts); 'full'
    (only each block's input is kept; the whole block runs again in backward: about one more forward)."""
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
    moe_bias_update_rate: float = 1e-3
    """MoE ('E') layers: auxiliary-loss-free balancing, each expert's routing bias moved by this much per
    step towards even load (0 = off; megatron-core's and DeepSeek-V3's default 1e-3)."""
    moe_aux_loss_coeff: float = 0.0
    """MoE ('E') layers: weight of the load-balancing loss E * sum f_e P_e (0 = off)."""

    def validate(self) -> None:
        _positive_int("train", self, "micro_batch_size", "global_batch_size", "max_steps", "log_interval",
                      "eval_batches", "keep_last")  # fmt: skip
        _non_negative("train", self, "lr", "min_lr", "warmup_steps", "weight_decay", "adam_eps", "clip_grad",
                      "eval_interval", "save_interval", "moe_bias_update_rate", "moe_aux_loss_coeff")  # fmt: skip
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
        if self.params_dtype not in PARAMS_DTYPES:
            raise ConfigError(f"train.params_dtype={self.params_dtype!r} is invalid; use {', '.join(PARAMS_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.device!r} is invalid; use auto, cpu or cuda")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"train.recompute={self.recompute!r} is invalid; use {', '.join(RECOMPUTE_MODES)}")
        if not 0 <= self.seed < 2**32:  # NumPy's generators take seeds in [0, 2**32)
            raise ConfigError(f"train.seed={self.seed} is invalid; give an integer in [0, 2**32)")


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
    mlflow_timeout_s: int = 10
    """Seconds one MLflow HTTP request may take (no retries inside MLflow): a dead server costs this, not minutes."""
    mlflow_retry_s: float = 30.0
    """After a failed MLflow call, records are spooled and the server is tried again after this many
    seconds (doubling up to 10x while it stays down)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for the MFU estimate; 0 = known GPUs (A100, H100, H200), none on CPU."""

    def validate(self) -> None:
        if self.mlflow_timeout_s < 1 or self.mlflow_retry_s < 0 or self.peak_tflops < 0:
            raise ConfigError(f"tracking: mlflow_timeout_s={self.mlflow_timeout_s} must be >= 1, mlflow_retry_s="
                              f"{self.mlflow_retry_s} and peak_tflops={self.peak_tflops} >= 0; fix them")  # fmt: skip
        if not isinstance(self.backends, list) or not self.backends:
            raise ConfigError(f"tracking.backends={self.backends!r} is invalid; give a list, e.g. [console, mlflow]")
        for b in self.backends:
            if b not in ("console", "mlflow"):
                raise ConfigError(f"tracking.backends contains {b!r}; use console and/or mlflow")


def check_fractions(key: str, values, *, item: str = "entry", full: str = "the parent's own size") -> list[float]:
    """``values`` as floats, or a one-line ConfigError unless they are fractions in (0, 1], unique,
    sorted largest first (nested) and starting with 1.0. ``key`` names the setting in messages;
    ``item`` and ``full`` word them (e.g. "budget", "the full model")."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        what = "fractions of the parent" if item == "budget" else "a list of fractions"
        raise ConfigError(f"{key}={values!r} is invalid; give {what} such as [1.0, 0.75, 0.5]")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise ConfigError(f"{key} contains {v!r}; every {item} must be a fraction in (0, 1]")
    values = [float(v) for v in values]
    if values != sorted(set(values), reverse=True):
        raise ConfigError(f"{key}={values} must be unique and sorted largest first (nested sizes); sort them")
    if values[0] != 1.0:
        raise ConfigError(f"{key}={values} must start with 1.0 ({full}); add 1.0")
    return values


@dataclass(kw_only=True)
class ElasticConfig:
    """Elastic nested distillation: the parent, the search space, the budgets and the router."""

    parent: str = ""
    """Native (or Hugging Face) directory of the parent, ideally permuted by `megatron-elastic importance`."""
    ranking: str = ""
    """ranking.json with the depth removal order; empty = next to the parent (DIR/../ranking.json) if present."""
    budgets: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    """Target costs as fractions of the parent's, largest first; the first is the full model (1.0)."""
    cost: str = "params"
    """What a budget limits: 'params', 'active_params' (the parameters one token uses: MoE layers count their
    top-k experts only), 'memory' (weights + KV cache + Mamba state) or 'latency'."""
    hidden: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5])
    """Allowed hidden sizes, as fractions of the parent's."""
    ffn: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25])
    """Allowed FFN sizes."""
    attn_heads: list[float] = field(default_factory=lambda: [1.0, 0.5])
    """Allowed query-head counts (trimmed inside each KV group)."""
    mamba_heads: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5])
    """Allowed Mamba head counts (trimmed inside each group)."""
    mamba_head_dim: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75])
    """Allowed Mamba head_dim sizes."""
    moe_experts: list[float] = field(default_factory=lambda: [1.0])
    """Allowed routed-expert counts of MoE ('E') layers (trimmed inside each routing group, >= 2 per group)."""
    moe_ffn: list[float] = field(default_factory=lambda: [1.0])
    """Allowed FFN widths of the routed experts (one width for all experts of a layer)."""
    moe_shared_ffn: list[float] = field(default_factory=lambda: [1.0])
    """Allowed widths of the shared expert."""
    depth: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75])
    """Allowed fractions of layers kept (the least important are dropped first)."""
    heterogeneous: bool = False
    """Per-layer choices for FFN / attention / Mamba / MoE (hidden and depth stay global)."""
    multiple_of: int = 1
    """Round every size down to a multiple of this (e.g. 16 for FP8 GEMMs)."""
    protect_attention: bool = False
    """Keep attention layers out of depth and head cuts."""
    mask_mode: str = "hard"
    """'hard' (argmax choice, straight-through to the router) or 'soft' (probability-weighted masks)."""
    router_hidden: int = 256
    """Width of the router's hidden layer."""
    router_lr_multiplier: float = 100.0
    """Router learning rate = this x train.lr."""
    router_loss_weight: float = 1.0
    """lambda in  loss = KD + lambda * router loss."""
    router_tolerance: float = 0.05
    """The router loss is zero while |cost / (budget * full cost) - 1| stays within this."""
    router_warmup_steps: int = 300
    """Before training, fit the router to the budgets on the cost alone (no data, no model
    forward) for this many Adam steps, so training starts from architectures that meet their budgets."""
    router_warmup_lr: float = 0.01
    """Learning rate of the router warm-up."""
    tau_start: float = 1.0
    """Gumbel-softmax temperature at the first step."""
    tau_end: float = 0.05
    """Gumbel-softmax temperature at the last step."""
    tau_schedule: str = "exponential"
    """How tau anneals: 'exponential', 'linear' or 'cosine'."""
    scale_start: float = 1.0
    """Router logit scale at the first step."""
    scale_end: float = 10.0
    """Router logit scale at the last step (rises linearly)."""
    memory_batch: int = 1
    """Batch size the memory cost assumes."""
    memory_context: int = 8192
    """Context length the memory cost assumes."""
    memory_bytes_per_param: int = 2
    """Bytes per weight / cache element in the memory cost (2 = bf16)."""
    latency_table: str = ""
    """JSON latency table from `megatron-elastic profile` (cost: latency)."""

    def validate(self) -> None:
        for name in ("budgets", "hidden", "ffn", "attn_heads", "mamba_heads", "mamba_head_dim", "moe_experts", "moe_ffn",
                     "moe_shared_ffn", "depth"):  # fmt: skip
            check_fractions(f"elastic.{name}", getattr(self, name),
                            full="the full model" if name == "budgets" else "the parent's own size")  # fmt: skip
        if self.cost not in ("params", "active_params", "memory", "latency"):
            raise ConfigError(f"elastic.cost={self.cost!r} is invalid; use params, active_params, memory or latency")
        if self.cost == "latency" and not self.latency_table:
            raise ConfigError("elastic.cost=latency needs elastic.latency_table (run `megatron-elastic profile`)")
        if self.mask_mode not in ("hard", "soft"):
            raise ConfigError(f"elastic.mask_mode={self.mask_mode!r} is invalid; use hard or soft")
        if self.tau_schedule not in ("exponential", "linear", "cosine"):
            raise ConfigError(f"elastic.tau_schedule={self.tau_schedule!r} is invalid; use exponential, linear or cosine")
        _positive_int("elastic", self, "router_hidden", "multiple_of", "memory_batch", "memory_context",
                      "memory_bytes_per_param")  # fmt: skip
        _non_negative("elastic", self, "router_lr_multiplier", "router_loss_weight", "router_tolerance",
                      "router_warmup_steps", "router_warmup_lr")  # fmt: skip
        for name in ("tau_start", "tau_end", "scale_start", "scale_end"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"elastic.{name}={getattr(self, name)!r} is invalid; it must be > 0")


@dataclass(kw_only=True)
class DistillConfig:
    """Nested knowledge distillation from the frozen parent, and the budget curriculum."""

    temperature: float = 1.0
    """Softmax temperature of the KD loss (the loss is scaled by T^2)."""
    kd_weight: float = 1.0
    """Weight of KL(teacher || student)."""
    ce_weight: float = 0.0
    """Weight of the plain next-token cross-entropy."""
    top_k: int = 0
    """KD on the teacher's top-k tokens only (0 = full vocabulary)."""
    budgets_per_micro_batch: int = 0
    """Budgets trained against one teacher forward (0 = all budgets: the sandwich)."""
    full_model_prob: float = 0.0
    """Probability that a sampled budget is the full model regardless of the weights."""
    stage1_weights: list[float] = field(default_factory=list)
    """Stage-1 budget sampling weights (empty = uniform)."""
    stage2_weights: list[float] = field(default_factory=list)
    """Stage-2 weights (paper: 0.5 / 0.3 / 0.2 for 12B / 9B / 6B); empty = same as stage 1."""
    stage2_start_step: int = 0
    """Step at which stage 2 starts (0 = never, unless stage2_start_tokens)."""
    stage2_start_tokens: int = 0
    """Tokens after which stage 2 starts (0 = unused)."""
    stage2_seq_len: int = 0
    """Stage-2 sequence length (0 = same as data.seq_len)."""

    def validate(self) -> None:
        _non_negative("distill", self, "kd_weight", "ce_weight", "full_model_prob", "top_k",
                      "budgets_per_micro_batch", "stage2_start_step", "stage2_start_tokens", "stage2_seq_len")  # fmt: skip
        if not self.temperature > 0:
            raise ConfigError(f"distill.temperature={self.temperature!r} is invalid; it must be > 0")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ConfigError("distill.kd_weight and distill.ce_weight are both 0; give at least one a weight")
        if self.full_model_prob > 1:
            raise ConfigError(f"distill.full_model_prob={self.full_model_prob} is not a probability; use [0, 1]")
        for name in ("stage1_weights", "stage2_weights"):
            w = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in w) or (w and sum(w) <= 0):
                raise ConfigError(f"distill.{name}={w} is invalid; give non-negative weights with a positive sum")


FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise")


@dataclass(kw_only=True)
class FP8Config:
    """The FP8 recipe (Transformer Engine, CUDA only): the ``parallel.fp8`` section."""

    enabled: bool = False
    """Run the GEMMs of the inner layers in FP8 (all but the first and last ``bf16_layers``)."""
    format: str = "hybrid"
    """'hybrid' (E4M3 forward, E5M2 gradients) or 'e4m3' (both)."""
    recipe: str = "delayed"
    """Scaling: 'delayed' (amax history, Megatron's default) or 'tensorwise' (current per-tensor scaling)."""
    amax_history_len: int = 1024
    """Steps of amax history the delayed recipe keeps."""
    amax_compute_algo: str = "max"
    """'max' (of the history) or 'most_recent'."""
    margin: int = 0
    """Scale margin in powers of two."""
    bf16_layers: int = 1
    """The first and the last this-many layers stay in bf16 (as Nemotron-H keeps them)."""

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"parallel.fp8.enabled={self.enabled!r} is invalid; use true or false")
        if self.format not in FP8_FORMATS:
            raise ConfigError(f"parallel.fp8.format={self.format!r} is invalid; use {' or '.join(FP8_FORMATS)}")
        if self.recipe not in FP8_RECIPES:
            raise ConfigError(f"parallel.fp8.recipe={self.recipe!r} is invalid; use {' or '.join(FP8_RECIPES)}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ConfigError(f"parallel.fp8.amax_compute_algo={self.amax_compute_algo!r} is invalid; use max or most_recent")
        for name in ("amax_history_len", "margin", "bf16_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "amax_history_len" else 0):
                raise ConfigError(f"parallel.fp8.{name}={v!r} is invalid; it must be a "
                                  f"{'positive' if name == 'amax_history_len' else 'non-negative'} integer")  # fmt: skip

    def layer_in_fp8(self, index: int, num_layers: int) -> bool:
        """Whether layer ``index`` runs its GEMMs in FP8 (not one of the first/last bf16 layers)."""
        return self.enabled and self.bf16_layers <= index < num_layers - self.bf16_layers


@dataclass(kw_only=True)
class ParallelConfig:
    """How one model replica is split over processes (megatron-core tensor / pipeline / data parallel)."""

    tp: int = 1
    """Tensor-parallel size: layers split by heads / neurons / vocabulary over this many ranks."""
    pp: int = 1
    """Pipeline-parallel size: the layer list cut into this many stages ('|' in the pattern, else balanced)."""
    dp: int = 0
    """Data-parallel size; 0 = derived as world_size / (tp * pp). A non-zero value is checked against it."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside tensor-parallel groups (needs tp > 1)."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 GEMMs with Transformer Engine (CUDA only): the ``parallel.fp8`` section."""
    distributed_optimizer: bool = False
    """megatron-core's DistributedDataParallel + DistributedOptimizer: fp32 main weights and Adam moments
    sharded over the data-parallel ranks (1/dp each), gradients reduce-scattered (CUDA)."""

    def validate(self) -> None:
        _positive_int("parallel", self, "tp", "pp")
        if not isinstance(self.fp8, FP8Config):
            raise ConfigError(f"parallel.fp8={self.fp8!r} is invalid; it is a section: write parallel.fp8.enabled=true")
        self.fp8.validate()
        if isinstance(self.dp, bool) or not isinstance(self.dp, int) or self.dp < 0:
            raise ConfigError(f"parallel.dp={self.dp!r} is invalid; give a positive integer or 0 (derived from the world size)")
        if not isinstance(self.distributed_optimizer, bool):
            raise ConfigError(f"parallel.distributed_optimizer={self.distributed_optimizer!r} is invalid; use true or false")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend={self.backend!r} is invalid; use auto, nccl or gloo")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1; raise tp or turn it off")

    def resolve_dp(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` processes (ConfigError when they do not tile)."""
        model = self.tp * self.pp
        if world_size % model:
            raise ConfigError(f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = {model}; "
                              "launch a multiple of tp * pp processes or change tp / pp")  # fmt: skip
        dp = world_size // model
        if self.dp and self.dp != dp:
            raise ConfigError(f"parallel.dp={self.dp} but {world_size} processes / (tp {self.tp} x pp {self.pp}) = {dp}; "
                              "set parallel.dp=0 (derived) or launch tp * pp * dp processes")  # fmt: skip
        return dp


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
    elastic: ElasticConfig | None = None
    """Present = elastic nested distillation from elastic.parent (absent = plain pretraining)."""
    distill: DistillConfig | None = None
    """Distillation settings of an elastic run (defaults when absent)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallel layout (used by launch/train.py; single process ignores it)."""

    def validate(self) -> None:
        self.data.validate()
        self.train.validate()
        self.tracking.validate()
        self.parallel.validate()
        if self.distill is not None and self.elastic is None:
            raise ConfigError("a distill section needs an elastic section (elastic.parent, elastic.budgets)")
        if self.elastic is not None:
            if self.distill is None:
                self.distill = DistillConfig()
            self.elastic.validate()
            self.distill.validate()
            n = len(self.elastic.budgets)
            for name in ("stage1_weights", "stage2_weights"):
                w = getattr(self.distill, name)
                if w and len(w) != n:
                    raise ConfigError(f"distill.{name} has {len(w)} entries for {n} budgets; give one weight per budget")
            if self.distill.budgets_per_micro_batch > n:
                raise ConfigError(f"distill.budgets_per_micro_batch={self.distill.budgets_per_micro_batch} exceeds "
                                  f"the {n} budgets; lower it (0 = all)")  # fmt: skip
            if not self.elastic.parent:
                raise ConfigError("elastic.parent is empty; give the parent checkpoint (run `megatron-elastic importance` first)")
        if self.data.tokenizer == "builtin" and self.data.tokenizer_vocab_size > self.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer_vocab_size={self.data.tokenizer_vocab_size} exceeds model.vocab_size="
                f"{self.model.vocab_size}; lower the tokenizer vocabulary or raise the model's"
            )
        if self.parallel.fp8.enabled and self.train.recompute != "none":
            # Recomputing a Transformer Engine FP8 layer with a plain checkpoint records its amax twice and
            # recomputes with other scales; that needs TE's own checkpoint, not wired here.
            raise ConfigError(f"train.recompute={self.train.recompute} with parallel.fp8.enabled=true is not supported; "
                              "use train.recompute=none with FP8 (or turn FP8 off)")  # fmt: skip
        if not self.run_dir:
            raise ConfigError("run_dir is empty; give a directory for checkpoints and metrics")

    def to_dict(self) -> dict:
        out = {
            "model": self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "tracking": dataclasses.asdict(self.tracking),
            "run_dir": self.run_dir,
            "parallel": dataclasses.asdict(self.parallel),
        }
        if self.elastic is not None:
            out["elastic"] = dataclasses.asdict(self.elastic)
            out["distill"] = dataclasses.asdict(self.distill or DistillConfig())
        return out
