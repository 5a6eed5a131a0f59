"""YAML recipes with dotted command-line overrides -> a validated :class:`RunConfig`.

``load_config("configs/tiny.yaml", ["train.lr=3e-4", "model.hidden_size=256"])``. Unknown keys are
errors that suggest the nearest valid key; values are checked against the field types (floats finite,
integers within :data:`MAX_INT`).

Config files are untrusted input: :func:`read_yaml` reads bytes first and refuses, in one line, a file
that is too large, not UTF-8, nested too deeply or whose anchors would expand past a bound (a "billion
laughs" file is a few hundred bytes), before anything is built from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path

import yaml

from megatron_elastic.config.schema import (
    DataConfig,
    DistillConfig,
    ElasticConfig,
    FP8Config,
    ParallelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)
from megatron_elastic.errors import ConfigError, shown
from megatron_elastic.model.config import HybridConfig, preset
from megatron_elastic.utils.redact import redact

SECTIONS = {"model": HybridConfig, "data": DataConfig, "train": TrainConfig, "tracking": TrackingConfig,
            "elastic": ElasticConfig, "distill": DistillConfig, "parallel": ParallelConfig}  # fmt: skip
OPTIONAL_SECTIONS = ("elastic", "distill")
TOP_LEVEL = set(SECTIONS) | {"run_dir"}
# Sections inside a section, by the field's annotation: ``parallel: {fp8: {enabled: true}}``.
NESTED_SECTIONS = {"FP8Config": FP8Config}
# Keys of earlier versions -> the key that replaced them (a one-line error names the new one).
RENAMED_KEYS = {"parallel.fp8": "parallel.fp8.enabled",
                **{f"parallel.fp8_{name}": f"parallel.fp8.{name}" for name in ("format", "recipe", "amax_history_len",
                                                                              "amax_compute_algo", "margin", "bf16_layers")}}  # fmt: skip


# Bounds on a config file (a recipe is a few kilobytes; these leave room for long per-layer lists).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000
# No integer setting is meaningful beyond this (steps, sizes, tokens: 2**53 is 9e15); larger ones overflow later.
MAX_INT = 2**53


def parse_yaml(text: str, where: str):
    """``text`` as YAML (safe types only), refused with a one-line ConfigError naming ``where`` when it
    is not YAML, is nested deeper than :data:`MAX_YAML_DEPTH` or its aliases expand to more than
    :data:`MAX_YAML_NODES` nodes."""
    try:
        return _bounded_yaml(text, where)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = shown(getattr(exc, "problem", None) or type(exc).__name__)
        raise ConfigError(f"{where} is not valid YAML{at} ({problem}); fix the syntax") from None


def _bounded_yaml(text: str, where: str):
    """:func:`parse_yaml` letting ``yaml.YAMLError`` through. The depth is measured on the event stream
    (no recursion), the expansion on the node graph with each anchored node counted once per use,
    before any value is built."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where} is nested deeper than {MAX_YAML_DEPTH} levels; a config is a few levels "
                                  "of sections and lists: fix the file")  # fmt: skip
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(node, {}, set(), where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _count_nodes(node, counts: dict, open_: set, where: str) -> int:
    """Nodes of ``node`` with every alias expanded (memoised per node, so linear in the file); over the
    bound, or an anchor used inside itself, is a ConfigError. Recursion is bounded by the depth check."""
    key = id(node)
    if key in counts:
        return counts[key]
    if key in open_:
        raise ConfigError(f"{where} has an anchor used inside itself (a recursive alias); remove the alias")
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_count_nodes(child, counts, open_, where) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_count_nodes(k, counts, open_, where) + _count_nodes(v, counts, open_, where)
                     for k, v in node.value)  # fmt: skip
    open_.discard(key)
    if total > MAX_YAML_NODES:
        raise ConfigError(f"{where} expands to more than {MAX_YAML_NODES:,} values (anchors and aliases multiply); "
                          "write the values out instead of nesting aliases")  # fmt: skip
    counts[key] = total
    return total


def read_yaml(path: Path, what: str = "config file"):
    """The YAML document in ``path``, read as bytes first: over :data:`MAX_CONFIG_BYTES`, not UTF-8, or
    beyond :func:`parse_yaml`'s bounds is a one-line ConfigError."""
    where = f"{what} {shown(str(path))}"
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} has {size:,} bytes, more than a config may ({MAX_CONFIG_BYTES:,}); "
                              "give the YAML recipe, not a data file")  # fmt: skip
        data = path.read_bytes()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"{where} cannot be read ({why}); give a readable YAML file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}); give a YAML recipe such as "
                          "configs/tiny.yaml") from None  # fmt: skip
    if "\x00" in text:
        raise ConfigError(f"{where} holds NUL bytes; it is not a YAML text file")
    return parse_yaml(text, where)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _all_keys() -> list[str]:
    keys = ["run_dir", "model.preset"]
    for section, cls in SECTIONS.items():
        for name, f in _fields(cls).items():
            nested = NESTED_SECTIONS.get(f.type)
            keys += [f"{section}.{name}.{sub}" for sub in _fields(nested)] if nested else [f"{section}.{name}"]
    return keys


def _nested_fields(cls) -> set[str]:
    return {name for name, f in _fields(cls).items() if f.type in NESTED_SECTIONS}


def _renamed(key: str) -> ConfigError:
    return ConfigError(f"config key {key!r} was replaced by {RENAMED_KEYS[key]!r}; write {RENAMED_KEYS[key]}=... "
                       "(the FP8 settings are the parallel.fp8 section)")  # fmt: skip


def _unknown(key) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6) if isinstance(key, str) else []
    hint = f"; did you mean {near[0]!r}?" if near else "; see configs/tiny.yaml for the valid keys"
    return ConfigError(f"unknown config key {shown(key)}{hint}")


def parse_override(text: str) -> tuple[list[str], object]:
    """``'train.lr=3e-4'`` -> (['train', 'lr'], '3e-4' parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise ConfigError(f"bad override {shown(text)}; write section.key=value, e.g. train.lr=3e-4")
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"override {shown(key)} has a value of {len(raw):,} characters; give a short value")
    try:
        value = _bounded_yaml(raw, f"override {shown(key)}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a plain string that happens not to be YAML (e.g. 'a: b: c')
    return parts, value


def finite_number(key: str, value) -> float:
    """A finite float from a YAML number or a numeric string ('3e-4'); NaN and infinity are refused (an
    infinite learning rate trains to NaN, a NaN one fails inside the optimizer)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}={shown(value)} is invalid; it must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={shown(value)} is invalid; it must be a number")
    try:
        value = float(value)
    except OverflowError:
        raise ConfigError(f"{key}={shown(value)} is out of range; give a finite number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value} is invalid; it must be a finite number")
    return value


def bounded_int(key: str, value) -> int:
    """An integer (a whole float such as 8.0 too) of magnitude at most :data:`MAX_INT`; bools are refused."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={shown(value)} is invalid; it must be an integer")
    if abs(value) > MAX_INT:
        raise ConfigError(f"{key}={shown(value)} is out of range; it must be at most {MAX_INT:,} in magnitude")
    return value


# List settings whose entries may be infinite: the dt clamp's upper end (NemotronH clamps to (dt_min, inf)).
INFINITE_OK = {"model.mamba_dt_limit"}


def _coerce(key: str, value, annotation):
    """Check ``value`` against a field's type; YAML gives '3e-4' as a string and ints for floats."""
    annotation = str(getattr(annotation, "__name__", annotation))
    if value is None and "None" in annotation:
        return None
    if annotation == "float":
        return finite_number(key, value)
    if annotation == "int":
        return bounded_int(key, value)
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={shown(value)} is invalid; it must be true or false")
        return value
    if annotation == "str":
        if isinstance(value, (dict, list, bool)) or value is None:  # true would become 'True'
            raise ConfigError(f"{key}={shown(value)} is invalid; it must be a string")
        return str(value)
    if annotation.startswith(("list", "tuple")):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={shown(value)} is invalid; it must be a list")
        if "float" in annotation:
            out = []
            for v in value:
                if key in INFINITE_OK and str(v).lower() in ("inf", ".inf", "+inf"):
                    out.append(math.inf)
                else:
                    out.append(finite_number(key, v))
            return out
        if "int" in annotation:
            return [bounded_int(key, v) for v in value]
        if "str" in annotation:
            return [_coerce(key, v, "str") for v in value]
        return list(value)
    return value


def _build(cls, data: dict, section: str, base: dict | None = None):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {section!r} must be a mapping of keys to values, got {shown(data)}")
    fields = _fields(cls)
    values = dict(base or {})
    for key, value in data.items():
        name = f"{section}.{key}"
        if name in RENAMED_KEYS and not (key in fields and isinstance(value, dict)):
            raise _renamed(name)
        if key not in fields:
            raise _unknown(name)
        nested = NESTED_SECTIONS.get(fields[key].type)
        values[key] = _build(nested, value or {}, name) if nested else _coerce(name, value, fields[key].type)
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # fmt: skip
        raise ConfigError(f"config section {section!r} lacks required key(s) {', '.join(missing) or exc}; "
                          "add them or set model.preset") from None  # fmt: skip


def _parent_model(path: str) -> HybridConfig:
    from megatron_elastic.api import read_model_config

    return read_model_config(path, what="elastic.parent")


def config_from_dict(raw: dict) -> RunConfig:
    raw = dict(raw or {})
    for key in raw:
        if key not in TOP_LEVEL:
            raise _unknown(key)
    for key in SECTIONS:
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"config section {key!r} must be a mapping of keys to values, got {shown(raw[key])}")
    model_raw = dict(raw.get("model") or {})
    if "preset" in model_raw and not isinstance(model_raw["preset"], str):
        raise ConfigError(f"model.preset={shown(model_raw['preset'])} is invalid; give a preset name such as tiny")
    base = preset(model_raw.pop("preset")).to_dict() if "preset" in model_raw else None
    elastic_raw = raw.get("elastic") or {}
    if base is None and not model_raw and isinstance(elastic_raw, dict) and elastic_raw.get("parent"):
        base = _parent_model(str(elastic_raw["parent"])).to_dict()  # elastic runs take the parent's shape
    if base is None and not model_raw:
        raise ConfigError("config has no model section; set model.preset (e.g. tiny) or give the model's fields")
    cfg = RunConfig(
        model=_build(HybridConfig, model_raw, "model", base),
        data=_build(DataConfig, raw.get("data") or {}, "data"),
        train=_build(TrainConfig, raw.get("train") or {}, "train"),
        tracking=_build(TrackingConfig, raw.get("tracking") or {}, "tracking"),
        run_dir=_coerce("run_dir", raw.get("run_dir", "runs/default"), str),
        elastic=_build(ElasticConfig, raw["elastic"] or {}, "elastic") if "elastic" in raw else None,
        distill=_build(DistillConfig, raw["distill"] or {}, "distill") if "distill" in raw else None,
        parallel=_build(ParallelConfig, raw.get("parallel") or {}, "parallel"),
    )
    cfg.validate()
    return cfg


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = _copy(raw or {})
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) == 1:
            if parts[0] not in TOP_LEVEL or parts[0] in SECTIONS:
                raise _unknown(parts[0]) if parts[0] not in SECTIONS else ConfigError(
                    f"bad override {text!r}; {parts[0]!r} is a section: write {parts[0]}.key=value")
            raw[parts[0]] = value
        elif len(parts) == 2 and parts[0] in SECTIONS:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"config section {parts[0]!r} must be a mapping")
            section[parts[1]] = value
        elif len(parts) == 3 and parts[0] in SECTIONS and parts[1] in _nested_fields(SECTIONS[parts[0]]):
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"config section {parts[0]!r} must be a mapping")
            sub = section.setdefault(parts[1], {})
            if not isinstance(sub, dict):
                name = f"{parts[0]}.{parts[1]}"
                raise _renamed(name) if name in RENAMED_KEYS else ConfigError(f"config section {name!r} must be a mapping")
            sub[parts[2]] = value
        else:
            raise _unknown(".".join(parts))
    return raw


RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A YAML path as given, or the name of a recipe in the repository's configs/ ('tiny')."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    return candidate if candidate.is_file() else path


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (a path, or a recipe name such as 'tiny'), apply ``section.key=value``
    overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = resolve_recipe(path)
        if not path.is_file():
            raise ConfigError(f"config file {shown(str(path))} does not exist; give a YAML recipe such as "
                              "configs/tiny.yaml")  # fmt: skip
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {shown(str(path))} must hold a mapping with sections "
                              "model/data/train/tracking")  # fmt: skip
    return config_from_dict(apply_overrides(raw, list(overrides or [])))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, as run directories and checkpoints keep it: credentials in the
    tracking URI are redacted (user info, token-like query values), so the file holds no secret; the
    rest loads back to an equal config. A resumed run takes the URI from its command line again."""
    data = cfg.to_dict()
    data["tracking"]["mlflow_uri"] = redact(data["tracking"]["mlflow_uri"])
    return yaml.safe_dump(data, sort_keys=False)
