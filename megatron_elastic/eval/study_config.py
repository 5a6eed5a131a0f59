"""The study recipe (``configs/study-tiny.yaml``): one dataclass per part, validated once.

Overrides use the same dotted form as training recipes, one level deeper where a part nests:
``recall.steps=100``, ``eval.mqar.num_pairs=4``, ``elastic.overrides=[train.max_steps=60]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from megatron_elastic.config.loader import bounded_int, finite_number, parse_override, read_yaml, resolve_recipe
from megatron_elastic.errors import ConfigError, shown
from megatron_elastic.eval.harness import EvalConfig

BASELINES = ("one-shot", "separate", "depth-only", "scratch")


@dataclass(kw_only=True)
class ParentStage:
    """Pretraining the parent on the built-in corpus."""

    recipe: str = "tiny"
    """Training recipe (name in configs/ or a YAML path)."""
    overrides: list[str] = field(default_factory=list)
    """section.key=value overrides of that recipe (run_dir and data.cache_dir are set by the study)."""


@dataclass(kw_only=True)
class RecallStage:
    """Short recall fine-tuning of the parent: text and MQAR micro-batches interleaved."""

    steps: int = 200
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate (warmup, then cosine to lr / 10)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    mix_every: int = 2
    """Every mix_every-th micro-batch is MQAR (2 = half)."""


@dataclass(kw_only=True)
class ElasticStage:
    """The nested elastic distillation run (also sets the token budget of the baselines)."""

    recipe: str = "elastic-tiny"
    """Elastic recipe (elastic.parent and run_dir are set by the study)."""
    overrides: list[str] = field(default_factory=list)
    """section.key=value overrides of that recipe."""
    mix_every: int = 4
    """Every mix_every-th micro-batch of every distillation / training run after the parent's is MQAR."""
    protect_attention: list[bool] = field(default_factory=lambda: [False, True])
    """Runs to make: without and with elastic.protect_attention (true also sets attn_heads=[1.0])."""


@dataclass(kw_only=True)
class BaselineStage:
    """The alternatives, for the same child architectures and token budgets."""

    methods: list[str] = field(default_factory=lambda: list(BASELINES))
    """Any of one-shot, separate, depth-only, scratch."""
    scratch_lr: float = 3e-3
    """Peak learning rate of the from-scratch runs (the parent's pretraining rate)."""
    scratch_warmup_steps: int = 10
    """Warmup of the from-scratch runs."""
    depth_tolerance: float = 0.05
    """Depth-only keeps dropping layers until parameters <= budget x (1 + this)."""


@dataclass(kw_only=True)
class StudyConfig:
    """Everything one study does; every run is seeded from ``seed``."""

    seed: int = 0
    """Offsets every training seed and the MQAR training streams."""
    work_dir: str = "runs/study-tiny"
    """Checkpoints and intermediate files (replaced at the start)."""
    results: str = "docs/results.md"
    """The report to write."""
    images: str = "docs/img"
    """Where the plots go (PNG)."""
    data: list[str] = field(default_factory=list)
    """data.* overrides applied to every stage (e.g. data.builtin_max_mb=1.0)."""
    resume: bool = False
    """Keep work_dir and continue: every training run resumes from its last checkpoint (a finished
    run is not redone), and an existing importance ranking is reused. False = start afresh."""
    importance_batches: int = 8
    """Calibration batches (of 4 samples) for importance ranking."""
    parent: ParentStage = field(default_factory=ParentStage)
    recall: RecallStage = field(default_factory=RecallStage)
    elastic: ElasticStage = field(default_factory=ElasticStage)
    baselines: BaselineStage = field(default_factory=BaselineStage)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} is invalid; it must be an integer >= 0")
        for name in ("work_dir", "results", "images"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty; give a path")
        for o in self.data:
            if not str(o).startswith("data."):
                raise ConfigError(f"data override {o!r} is not a data.* setting; move it to parent/elastic overrides")
        if isinstance(self.importance_batches, bool) or not isinstance(self.importance_batches, int) or self.importance_batches < 1:
            raise ConfigError(f"importance_batches={self.importance_batches!r} is invalid; it must be a positive integer")
        r = self.recall
        for name in ("steps", "warmup_steps", "mix_every"):
            v = getattr(r, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1):
                raise ConfigError(f"recall.{name}={v!r} is invalid; it must be a positive integer")
        if not r.lr > 0:
            raise ConfigError(f"recall.lr={r.lr!r} is invalid; it must be > 0")
        if isinstance(self.elastic.mix_every, bool) or not isinstance(self.elastic.mix_every, int) or self.elastic.mix_every < 1:
            raise ConfigError(f"elastic.mix_every={self.elastic.mix_every!r} is invalid; it must be an integer >= 1")
        if not self.elastic.protect_attention or not all(isinstance(p, bool) for p in self.elastic.protect_attention):
            raise ConfigError("elastic.protect_attention must be a non-empty list of true/false, e.g. [false, true]")
        if self.elastic.protect_attention[0] is not False:
            raise ConfigError("elastic.protect_attention must start with false: the unprotected run sets the "
                              "baselines' architectures; use [false] or [false, true]")  # fmt: skip
        for m in self.baselines.methods:
            if m not in BASELINES:
                raise ConfigError(f"unknown baseline {m!r}; the baselines are {', '.join(BASELINES)}")
        if not self.baselines.scratch_lr > 0 or self.baselines.depth_tolerance < 0:
            raise ConfigError("baselines.scratch_lr must be > 0 and baselines.depth_tolerance >= 0")
        self.eval.validate()


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for name in _fields(cls):
        t = hints[name]
        keys.append(prefix + name)
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{name}.")
    return keys


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(StudyConfig), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else "; see configs/study-tiny.yaml for the valid keys"
    return ConfigError(f"unknown study key {key!r}{hint}")


def _coerce(key: str, value, t):
    origin = typing.get_origin(t)
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid; it must be true or false")
        return value
    if t is int:
        return bounded_int(key, value)
    if t is float:
        return finite_number(key, value)
    if t is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}={value!r} is invalid; it must be a string")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is invalid; it must be a list")
        (item,) = typing.get_args(t)
        return [_coerce(key, v, item) for v in value]
    return value


def build_section(cls, raw, prefix: str):
    """The dataclass ``cls`` from a mapping read from YAML / overrides; unknown keys and bad values are one-line
    ConfigErrors naming ``prefix + key``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"study section {prefix.rstrip('.') or 'top level'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints or key not in _fields(cls):
            raise _unknown(prefix + str(key))
        t = hints[key]
        values[key] = build_section(t, value or {}, f"{prefix}{key}.") if dataclasses.is_dataclass(t) else \
            _coerce(prefix + key, value, t)  # fmt: skip
    return cls(**values)


def set_dotted(raw: dict, overrides: list[str], strip: str = "") -> dict:
    """Apply ``a.b.c=value`` overrides to the nested mapping ``raw`` in place (a leading ``strip.`` is dropped);
    a key that would descend into a value (``a=1`` then ``a.b=2``) is a one-line ConfigError."""
    for text in overrides:
        parts, value = parse_override(text)
        if strip and parts[0] == strip:
            parts = parts[1:]
        if not parts:
            raise ConfigError(f"bad setting {text!r}; write {strip or 'section'}.key=value")
        node = raw
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"bad setting {text!r}: {'.'.join(parts[:i + 1])!r} was already set to a value "
                                  f"({shown(node)}), so it has no key {parts[i + 1]!r}; set one or the other")
        node[parts[-1]] = value
    return raw


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML (a path or a name in configs/), apply dotted overrides, validate."""
    path = resolve_recipe(path)
    if not Path(path).is_file():
        raise ConfigError(f"study config {str(path)!r} does not exist; give a YAML file such as configs/study-tiny.yaml")
    raw = read_yaml(Path(path), "study config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"study config {str(path)!r} must hold a mapping")
    set_dotted(raw, overrides or [])
    cfg = build_section(StudyConfig, raw, "")
    cfg.validate()
    return cfg
