"""One evaluation harness for every model of every method: the same data, the same metrics.

Per model: parameters, inference memory at a context length, measured CPU latency, and the tasks
asked for:

==========  ====================================================================================
task        what it measures
==========  ====================================================================================
loss        held-out loss (nats/token) and bits per byte on the built-in corpus's validation split
recall      multi-query associative recall accuracy on a fixed MQAR set (:mod:`.mqar`)
shift       loss and bits per byte on the shifted domain (:mod:`.shift`, license texts)
sample      a greedy continuation of a fixed prompt (incremental decoding with the Mamba state and
            the KV cache)
==========  ====================================================================================

:func:`build_context` reads and checks every input (tokenizer, validation batches, shifted
text, MQAR shape) before any model is evaluated, so a missing file fails in one line and nothing
is computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from megatron_elastic.errors import ConfigError
from megatron_elastic.eval.mqar import MQARConfig
from megatron_elastic.eval.tasks import TASKS


@dataclass(kw_only=True)
class EvalConfig:
    """What to measure and on how much data."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Any of loss, recall, shift, sample (parameters, memory and latency are always reported)."""
    batches: int = 8
    """Validation micro-batches (of batch_size x data.seq_len tokens) for loss and shift."""
    batch_size: int = 8
    """Samples per validation micro-batch."""
    shift_data: str = "/usr/share/common-licenses"
    """Directory (or file) of plain text for the shifted domain."""
    mqar: MQARConfig = field(default_factory=MQARConfig)
    """Shape of the recall task."""
    mqar_batches: int = 4
    """MQAR batches in the recall evaluation set."""
    mqar_batch_size: int = 64
    """Sequences per MQAR batch."""
    mqar_seed: int = 777
    """Seed of the recall evaluation set (training streams use other seeds)."""
    memory_context: int = 8192
    """Context length (tokens) the memory column assumes."""
    memory_batch: int = 1
    """Sequences the memory column assumes."""
    memory_bytes: int = 2
    """Bytes per weight / cache element in the memory column (2 = bf16)."""
    latency_len: int = 256
    """Tokens per timed forward pass (batch 1)."""
    latency_repeats: int = 7
    """Timed rounds; the median is reported."""
    sample_prompt: str = "def "
    """Prompt of the greedy sample."""
    sample_tokens: int = 24
    """Tokens generated for the greedy sample."""

    def validate(self, vocab_size: int | None = None) -> None:
        if isinstance(self.tasks, str) or not isinstance(self.tasks, list):
            raise ConfigError(f"eval.tasks={self.tasks!r} is invalid; give a list such as [loss, recall, shift]")
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"unknown eval task {t!r}; the tasks are {', '.join(TASKS)}")
        for name in ("batches", "batch_size", "mqar_batches", "mqar_batch_size", "memory_context", "memory_batch",
                     "memory_bytes", "latency_len", "latency_repeats", "sample_tokens"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"eval.{name}={v!r} is invalid; it must be a positive integer")
        if "sample" in self.tasks and not self.sample_prompt:
            raise ConfigError("eval.sample_prompt is empty; give a prompt or drop the 'sample' task")
        self.mqar.validate(vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_tasks(text: str) -> list[str]:
    """'loss,recall' -> ['loss', 'recall']; 'all' -> every task; unknown names -> ConfigError."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    if not names:
        raise ConfigError(f"--tasks {text!r} names no task; give some of {', '.join(TASKS)} (comma-separated) or all")
    for t in names:
        if t not in TASKS:
            raise ConfigError(f"unknown task {t!r}; the tasks are {', '.join(TASKS)} (comma-separated) or all")
    return list(dict.fromkeys(names))


@dataclass
class EvalContext:
    """Everything the metrics read, prepared once."""

    config: EvalConfig
    tokenizer: object
    byte_lengths: object
    valid: list
    shift: list
    latency_tokens: torch.Tensor
    prompt: torch.Tensor | None
    vocab_size: int


def build_context(run_cfg, ecfg: EvalConfig, *, log=lambda m: None) -> EvalContext:
    """Tokenizer, validation batches, shifted-domain batches and prompt for ``run_cfg``'s data
    section; every input is checked here, before any evaluation."""
    from megatron_elastic.eval.metrics import token_byte_lengths
    from megatron_elastic.eval.shift import shift_batches, shift_files
    from megatron_elastic.training.data_setup import build_training_data

    ecfg.validate(run_cfg.model.vocab_size)
    if "shift" in ecfg.tasks:
        shift_files(ecfg.shift_data)  # a missing directory fails before the corpus is prepared
    data = build_training_data(run_cfg, log=log)
    valid = []
    from megatron_elastic.data.loader import PackedLoader

    per_pass = len(data.valid_dataset) // ecfg.batch_size
    if per_pass == 0:
        raise ConfigError(f"the validation split has {len(data.valid_dataset)} samples, fewer than eval.batch_size="
                          f"{ecfg.batch_size}; lower it")  # fmt: skip
    loader = PackedLoader(data.valid_dataset, micro_batch_size=ecfg.batch_size, shuffle=False)
    for _ in range(min(ecfg.batches, per_pass)):
        valid.append(next(loader))
    tok = data.tokenizer
    shift = []
    if "shift" in ecfg.tasks:
        shift = shift_batches(ecfg.shift_data, tok, seq_len=run_cfg.data.seq_len, batch_size=ecfg.batch_size,
                              num_batches=ecfg.batches)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    latency_tokens = torch.randint(0, tok.vocab_size, (1, ecfg.latency_len), generator=g)
    prompt = None
    if "sample" in ecfg.tasks:
        ids = tok.encode(ecfg.sample_prompt)
        prompt = torch.tensor([ids], dtype=torch.int64)
    return EvalContext(ecfg, tok, token_byte_lengths(tok), valid, shift, latency_tokens, prompt, run_cfg.model.vocab_size)


def evaluate_models(models: dict[str, object], ctx: EvalContext, *, log=lambda m: None) -> dict[str, dict]:
    """Every metric for every model (name -> HybridLM); latency is timed interleaved across models."""
    from megatron_elastic.eval import mqar
    from megatron_elastic.eval.metrics import inference_memory, latencies_ms, loss_and_bpb
    from megatron_elastic.model.config import num_parameters

    ecfg = ctx.config
    out: dict[str, dict] = {}
    for name, model in models.items():
        model.eval()
        row: dict = {"parameters": model.num_parameters(), "pattern": model.config.pattern,
                     "hidden": model.config.hidden_size}  # fmt: skip
        assert row["parameters"] == sum(num_parameters(model.config).values())
        mem = inference_memory(model.config, context=ecfg.memory_context, batch=ecfg.memory_batch,
                               bytes_per_element=ecfg.memory_bytes)  # fmt: skip
        row["memory_bytes"] = mem["total"]
        row["memory"] = mem
        if "loss" in ecfg.tasks:
            r = loss_and_bpb(model, ctx.valid, ctx.byte_lengths)
            row["loss"], row["bpb"] = r["loss"], r["bpb"]
        if "shift" in ecfg.tasks:
            r = loss_and_bpb(model, ctx.shift, ctx.byte_lengths)
            row["shift_loss"], row["shift_bpb"] = r["loss"], r["bpb"]
        if "recall" in ecfg.tasks:
            row["recall"] = mqar.accuracy(model, ecfg.mqar, num_batches=ecfg.mqar_batches,
                                          batch_size=ecfg.mqar_batch_size, seed=ecfg.mqar_seed)  # fmt: skip
        if "sample" in ecfg.tasks:
            row["sample"] = greedy_sample(model, ctx)
        out[name] = row
        log(f"[eval] {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items() if k not in ("memory", "sample")))  # fmt: skip
    for name, ms in zip(out, latencies_ms(list(models.values()), ctx.latency_tokens, repeats=ecfg.latency_repeats)):
        out[name]["latency_ms"] = ms
    return out


def greedy_sample(model, ctx: EvalContext) -> str:
    """The prompt and its greedy continuation, decoded (incremental decoding)."""
    from megatron_elastic.inference import greedy_generate

    ids = greedy_generate(model, ctx.prompt, ctx.config.sample_tokens, use_cache=True)
    return ctx.tokenizer.decode(ids[0].tolist())
