"""``megatron-elastic plan``: will a run fit, and how long will its steps and checkpoints take, before
hours of a cluster are spent finding out.

For a recipe and a job shape (nodes x GPUs per node) the plan gives, for each stage of the
curriculum (stage 2 at ``distill.stage2_seq_len`` when the recipe has one):

* the per-GPU memory of every item, from the memory model of :mod:`megatron_elastic.parallel.memory`
  (parameters counted per rank on the meta device, activations from saved-tensor counts measured on
  small shapes here and scaled);
* tokens and model FLOPs per step (the frozen teacher's forward once per micro-batch plus forward and
  backward of the masked student per sampled budget, each at the parent's width: masks do not shrink
  the GEMMs) and the step time at an assumed MFU;
* the checkpoint's size (weights, fp32 main weights when the weights are bf16, two Adam moments) and
  its save time at an assumed aggregate filesystem bandwidth, hence the stop-signal lead time a
  preempted job needs: two saves (a periodic one may be in flight) plus one step;
* a verdict: fits with the margin, or the first of the usual fixes, cheapest first, that makes it fit
  (distributed optimizer, sequence parallelism, recomputation, a smaller micro-batch, more TP).

Nothing needs the parent checkpoint or the data: the architecture is the recipe's model section, or
the parent's config when ``elastic.parent`` exists on this machine.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from megatron_elastic.errors import ConfigError

if TYPE_CHECKING:  # the command's registration stays light: torch and the models load when a plan is made
    from megatron_elastic.config import RunConfig
    from megatron_elastic.model.config import HybridConfig
    from megatron_elastic.parallel.memory import MemoryEstimate, MemoryLayout

# The memory model (parallel.memory: torch, the pipeline split, megatron-core) is imported where a plan is
# made, so that registering the command keeps the command line's start-up light.
GB = 1e9

DEFAULT_MFU = 0.35
DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16
DEFAULT_FS_GBPS = 5.0  # aggregate checkpoint write bandwidth of the job, GB/s
DEFAULT_MARGIN = 0.10


@dataclass(frozen=True)
class StagePlan:
    name: str
    seq_len: int
    layout: MemoryLayout
    memory: MemoryEstimate
    tokens_per_step: int
    flops_per_step: float
    step_s: float
    fits: bool
    fix: str | None
    """The change (``key=value ...``) that makes a stage that does not fit fit; None when it fits or nothing does."""


@dataclass(frozen=True)
class Plan:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    capacity: float
    margin: float
    parameters: int
    stages: tuple[StagePlan, ...]
    checkpoint_bytes: float
    save_s: float
    signal_s: int
    """The smallest stop-signal lead: 2 x the save time + the longest step, rounded up to 10 s."""
    assumptions: dict

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def verdict(self) -> str:
        """One line: every stage fits, or what the first stage that does not needs."""
        bad = next((s for s in self.stages if not s.fits), None)
        if bad is None:
            worst = max(self.stages, key=lambda s: s.memory.total)
            return (f"fits: every stage within {self.capacity / GB:.0f} GB per GPU with {self.margin:.0%} margin "
                    f"(largest: {worst.name}, {worst.memory.total / GB:.1f} GB)")  # fmt: skip
        usable = self.capacity * (1 - self.margin) / GB
        need = f"{bad.name} needs {bad.memory.total / GB:.1f} GB per GPU of {usable:.1f}"
        need += f" ({self.capacity / GB:.0f} GB - {self.margin:.0%})"
        if bad.fix:
            return f"{need}; set {bad.fix}"
        return (f"{need}, and no change of recomputation, sequence parallelism, distributed optimizer, micro-batch "
                "or TP makes it fit; use more pipeline stages or GPUs with more memory")  # fmt: skip

    def to_dict(self) -> dict:
        return {
            "fits": self.fits, "verdict": self.verdict(), "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
            "tp": self.tp, "pp": self.pp, "dp": self.dp, "gpu_memory_bytes": self.capacity, "margin": self.margin,
            "parameters": self.parameters, "checkpoint_bytes": self.checkpoint_bytes, "save_s": self.save_s,
            "signal_s": self.signal_s, "assumptions": self.assumptions,
            "stages": [{"name": s.name, "seq_len": s.seq_len, "fits": s.fits, "fix": s.fix,
                        "total_bytes": s.memory.total, "tokens_per_step": s.tokens_per_step,
                        "flops_per_step": s.flops_per_step, "step_s": s.step_s,
                        "layout": dataclasses.asdict(s.layout),
                        "items": [dataclasses.asdict(i) for i in s.memory.items]} for s in self.stages],
        }  # fmt: skip


def plan_model(cfg: RunConfig) -> HybridConfig:
    """The architecture to plan: the parent's config when ``elastic.parent`` is on this machine, else the recipe's."""
    if cfg.elastic is not None and cfg.elastic.parent and Path(cfg.elastic.parent).exists():
        from megatron_elastic.api import read_model_config

        return read_model_config(cfg.elastic.parent, what="elastic.parent")
    return cfg.model


def _stages(cfg: RunConfig) -> list[tuple[str, int]]:
    stages = [("stage 1", cfg.data.seq_len)]
    d = cfg.distill
    if cfg.elastic is not None and d is not None and (d.stage2_start_step or d.stage2_start_tokens):
        stages.append(("stage 2", d.stage2_seq_len or cfg.data.seq_len))
    return stages


def _flops_per_step(model: HybridConfig, cfg: RunConfig, layout: MemoryLayout) -> tuple[int, float]:
    from megatron_elastic.tracking.perf import forward_flops_per_token

    tokens = cfg.train.global_batch_size * layout.seq_len
    forward = forward_flops_per_token(model, layout.seq_len)
    per_token = 3 * forward * layout.budgets_per_micro_batch + (forward if cfg.elastic is not None else 0)
    return tokens, tokens * per_token


def _fixes(layout: MemoryLayout, model: HybridConfig, gpus_per_node: int) -> list[tuple[str, dict]]:
    """Single changes, cheapest first: (override text, layout fields)."""
    from megatron_elastic.parallel.tensor import check_tp_divisibility

    out = []
    if not layout.distributed_optimizer and layout.dp > 1:
        out.append(("parallel.distributed_optimizer=true", {"distributed_optimizer": True}))
    if layout.tp > 1 and not layout.sequence_parallel and layout.seq_len % layout.tp == 0:
        out.append(("parallel.sequence_parallel=true", {"sequence_parallel": True}))
    for mode in ("selective", "full"):
        order = ("none", "selective", "full")
        if order.index(mode) > order.index(layout.recompute):
            out.append((f"train.recompute={mode}", {"recompute": mode}))
    if layout.micro_batch_size > 1:
        half = layout.micro_batch_size // 2
        out.append((f"train.micro_batch_size={half}", {"micro_batch_size": half, "grad_accum": layout.grad_accum * 2}))
    tp = layout.tp * 2
    if tp <= gpus_per_node and layout.dp % 2 == 0:
        try:
            check_tp_divisibility(model, tp)
        except ConfigError:
            pass
        else:
            out.append((f"parallel.tp={tp}", {"tp": tp, "dp": layout.dp // 2}))
    return out


def _fix_for(model: HybridConfig, layout: MemoryLayout, capacity: float, margin: float, gpus_per_node: int):
    from megatron_elastic.parallel.memory import estimate_memory

    fixes = _fixes(layout, model, gpus_per_node)
    for text, change in fixes:  # one change
        if estimate_memory(model, dataclasses.replace(layout, **change)).fits(capacity, margin):
            return text
    texts, merged = [], {}
    for text, change in fixes:  # else the changes together, cheapest first, as few as needed
        if change.get("recompute") == "selective" and any(c.get("recompute") == "full" for _, c in fixes):
            continue  # full recomputation supersedes selective
        texts.append(text)
        merged.update(change)
        if estimate_memory(model, dataclasses.replace(layout, **merged)).fits(capacity, margin):
            return " ".join(texts)
    return None


def make_plan(cfg: RunConfig, *, nodes: int, gpus_per_node: int, gpu_memory: float = 80 * GB,
              margin: float = DEFAULT_MARGIN, mfu: float = DEFAULT_MFU, peak_tflops: float = DEFAULT_PEAK_TFLOPS,
              fs_gbps: float = DEFAULT_FS_GBPS) -> Plan:  # fmt: skip
    """The plan of ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs of ``gpu_memory`` bytes (see the module docstring)."""
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {value!r} is invalid; give a positive whole number")
    for name, value in (("--gpu-memory", gpu_memory), ("--mfu", mfu), ("--peak-tflops", peak_tflops),
                        ("--fs-bandwidth", fs_gbps)):  # fmt: skip
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} {value!r} is invalid; give a positive number")
    if mfu > 1:
        raise ConfigError(f"--mfu {mfu} is above 1; give the model-FLOPs utilisation as a fraction, e.g. 0.35")
    with warnings.catch_warnings():  # megatron-core says on import that TE / Apex are missing: a plan needs neither
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        return _make_plan(cfg, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory=gpu_memory, margin=margin, mfu=mfu,
                          peak_tflops=peak_tflops, fs_gbps=fs_gbps)  # fmt: skip


def _make_plan(cfg: RunConfig, *, nodes: int, gpus_per_node: int, gpu_memory: float, margin: float, mfu: float,
               peak_tflops: float, fs_gbps: float) -> Plan:  # fmt: skip
    from megatron_elastic.model.config import num_parameters
    from megatron_elastic.parallel.memory import MemoryLayout, estimate_memory

    model = plan_model(cfg)
    world = nodes * gpus_per_node
    dp = cfg.parallel.resolve_dp(world)
    stages = []
    for name, seq_len in _stages(cfg):
        layout = MemoryLayout.from_run_config(cfg, dp=dp, seq_len=seq_len)  # the run's precision, on GPUs
        memory = estimate_memory(model, layout)
        tokens, flops = _flops_per_step(model, cfg, layout)
        step_s = flops / (world * peak_tflops * 1e12 * mfu)
        fits = memory.fits(gpu_memory, margin)
        fix = None if fits else _fix_for(model, layout, gpu_memory, margin, gpus_per_node)
        stages.append(StagePlan(f"{name} ({seq_len:,} tokens)", seq_len, layout, memory, tokens, flops, step_s,
                                fits, fix))  # fmt: skip
    n = sum(num_parameters(model).values())
    # weights + two fp32 Adam moments (8 B), + fp32 main weights when the weights are bf16
    ckpt = n * (2 + 4 + 8 if layout.params_dtype == "bfloat16" else 4 + 8)
    save_s = ckpt / (fs_gbps * GB)
    signal = int(math.ceil((2 * save_s + max(s.step_s for s in stages)) / 10.0) * 10)
    assumptions = {"mfu": mfu, "peak_tflops_per_gpu": peak_tflops, "fs_bandwidth_gbps": fs_gbps,
                   "params_dtype": layout.params_dtype, "distributed_optimizer": layout.distributed_optimizer}  # fmt: skip
    return Plan(nodes, gpus_per_node, cfg.parallel.tp, cfg.parallel.pp, dp, gpu_memory, margin, n, tuple(stages),
                ckpt, save_s, max(signal, 10), assumptions)  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def format_plan(plan: Plan) -> str:
    """The plan as the text ``megatron-elastic plan`` prints."""
    from megatron_elastic.parallel.memory import format_table

    a = plan.assumptions
    lines = [f"plan: {plan.parameters / 1e9:.2f}B-parameter model on {plan.nodes} node(s) x {plan.gpus_per_node} "
             f"GPU(s) = {plan.nodes * plan.gpus_per_node}: tp={plan.tp} pp={plan.pp} dp={plan.dp}; "
             f"{a['params_dtype']} weights, distributed optimizer {'on' if a['distributed_optimizer'] else 'off'}",
             ""]  # fmt: skip
    lines.append(format_table({s.name: s.memory for s in plan.stages}, capacity=plan.capacity, margin=plan.margin))
    lines.append("")
    for s in plan.stages:
        L = s.layout
        lines.append(f"{s.name}: recompute={L.recompute} sequence_parallel={str(L.sequence_parallel).lower()} "
                     f"micro_batch={L.micro_batch_size} x {L.grad_accum} per rank x {L.budgets_per_micro_batch} "
                     f"budget(s); {s.tokens_per_step:,} tokens and {s.flops_per_step / 1e15:,.1f} PFLOP per step; "
                     f"~{_duration(s.step_s)} per step at MFU {a['mfu']:.2f} of {a['peak_tflops_per_gpu']:.0f} "
                     "TFLOP/s")  # fmt: skip
    lines.append(f"checkpoint: {plan.checkpoint_bytes / GB:,.1f} GB (weights, fp32 main weights and Adam moments); "
                 f"~{_duration(plan.save_s)} to save at {a['fs_bandwidth_gbps']:g} GB/s; stop-signal lead >= "
                 f"{plan.signal_s} s (2 saves + 1 step)")  # fmt: skip
    lines.append(("ok: " if plan.fits else "does not fit: ") + plan.verdict())
    return "\n".join(lines)


def parse_size(text: str) -> float:
    """``80GB`` / ``80G`` / ``141GiB`` -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT])(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m[1]) <= 0:
        raise ConfigError(f"--gpu-memory {text!r} is not a positive size with a unit; write e.g. 80GB or 141GiB")
    power = "KMGT".index(m[2].upper()) + 1
    return float(m[1]) * ((1024 if m[3] else 1000) ** power)


# ---------------------------------------------------------------------- the command
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="per-GPU memory, step and checkpoint times of a run before submitting it (exit 2: no fit)",
        description="Plan a recipe on NODES x GPUS: memory per GPU by item for each curriculum stage, tokens, "
                    "FLOPs and time per step, checkpoint size and save time, and a verdict (fits, or the change "
                    "that makes it fit). Needs neither the parent nor the data. See docs/scale.md.",
    )  # fmt: skip
    p.add_argument("--config", required=True, help="YAML recipe (path or name in configs/)")
    p.add_argument("--nodes", type=int, required=True, help="nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (one rank each)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB; e.g. 141GB for an H200)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="share of GPU memory kept free (default 0.10)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"assumed model-FLOPs utilisation (default {DEFAULT_MFU})")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help=f"dense bf16 peak of one GPU in TFLOP/s (default {DEFAULT_PEAK_TFLOPS:g}, H100/H200)")
    p.add_argument("--fs-bandwidth", type=float, default=DEFAULT_FS_GBPS, metavar="GB/S",
                   help=f"aggregate checkpoint write bandwidth of the job in GB/s (default {DEFAULT_FS_GBPS:g})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. parallel.tp=8")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    import json

    from megatron_elastic.config import load_config
    from megatron_elastic.errors import UserError

    if not (0 <= args.margin < 1):
        raise UserError(f"--margin {args.margin} is invalid; give a fraction in [0, 1), e.g. 0.1")
    capacity = parse_size(args.gpu_memory)
    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory=capacity, margin=args.margin,
                     mfu=args.mfu, peak_tflops=args.peak_tflops, fs_gbps=args.fs_bandwidth)  # fmt: skip
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan), flush=True)
    if not plan.fits:
        raise UserError(plan.verdict())
    return 0
