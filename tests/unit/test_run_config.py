"""YAML recipes, dotted overrides and their errors."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from megatron_elastic.config import config_from_dict, dump_config, load_config, parse_override
from megatron_elastic.errors import ConfigError
from megatron_elastic.training.schedule import lr_at

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_recipes_load():
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert tiny.model.pattern == "M-M*-M-" and tiny.train.global_batch_size == 16
    big = load_config(CONFIGS / "nemotron-nano-12b-v2.yaml")
    assert big.model.num_layers == 62 and big.model.hidden_size == 5120 and big.train.precision == "bf16"


def test_overrides_and_types():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.lr=3e-4", "model.hidden_size=64", "tracking.backends=console,mlflow",
                                              "run_dir=/tmp/x", "model.mamba_dt_limit=[0.001, inf]"])  # fmt: skip
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.hidden_size == 64 and cfg.model.ffn_hidden_size == 384  # preset value kept
    assert cfg.tracking.backends == ["console", "mlflow"]
    assert cfg.run_dir == "/tmp/x"
    assert cfg.model.mamba_dt_limit == (0.001, math.inf)


def test_resolved_config_round_trips():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.max_steps=7"])
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("trian.lr=1", "did you mean 'train.lr'?"),
        ("model.hiden_size=3", "did you mean 'model.hidden_size'?"),
        ("train.lr", "bad override 'train.lr'; write section.key=value"),
        ("=3", "bad override"),
        ("train..lr=3", "bad override"),
        ("train=3", "'train' is a section"),
        ("train.lr=abc", "train.lr='abc' is invalid; it must be a number"),
        ("train.max_steps=2.5", "train.max_steps=2.5 is invalid; it must be an integer"),
        ("train.global_batch_size=12", "not a multiple of train.micro_batch_size=8"),
        ("train.precision=fp8", "use auto, fp32 or bf16"),
        ("train.recompute=some", "train.recompute='some' is invalid; use none, selective, full"),
        ("train.params_dtype=bf16", "train.params_dtype='bf16' is invalid; use float32, bfloat16, auto"),
        ("parallel.distributed_optimizer=maybe", "parallel.distributed_optimizer='maybe' is invalid"),
        ("model.mamba_num_groups=3", "not divisible by model.mamba_num_groups=3"),
        ("model.preset=huge", "unknown model preset 'huge'"),
        ("data.tokenizer_vocab_size=1024", "exceeds model.vocab_size=512"),
        ("tracking.backends=[wandb]", "use console and/or mlflow"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_recompute_modes():
    for mode in ("none", "selective", "full"):
        assert load_config(CONFIGS / "tiny.yaml", [f"train.recompute={mode}"]).train.recompute == mode
    with pytest.raises(ConfigError, match=r"^train.recompute=full with parallel.fp8.enabled=true is not supported; use"):
        load_config(CONFIGS / "tiny.yaml", ["train.recompute=full", "parallel.fp8.enabled=true"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  preset: tiny\n train: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "nomodel.yaml").write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="no model section"):
        load_config(tmp_path / "nomodel.yaml")
    (tmp_path / "partial.yaml").write_text("model:\n  pattern: M-\n")
    with pytest.raises(ConfigError, match="lacks required key"):
        load_config(tmp_path / "partial.yaml")


def test_parse_override_yaml_values():
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_lr_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------------- parallel.fp8 (a nested section)
def test_fp8_section_loads_from_yaml_and_overrides(tmp_path):
    from megatron_elastic.config.schema import FP8Config

    recipe = tmp_path / "fp8.yaml"
    recipe.write_text("model:\n  preset: tiny\nparallel:\n  tp: 2\n  fp8: {enabled: true, format: e4m3, margin: 1}\n")
    cfg = load_config(recipe)
    assert cfg.parallel.tp == 2
    assert cfg.parallel.fp8 == FP8Config(enabled=True, format="e4m3", margin=1)
    # overrides merge into the YAML's section field by field
    cfg = load_config(recipe, ["parallel.fp8.format=hybrid", "parallel.fp8.recipe=tensorwise", "parallel.fp8.bf16_layers=2"])
    assert cfg.parallel.fp8 == FP8Config(enabled=True, format="hybrid", recipe="tensorwise", margin=1, bf16_layers=2)
    cfg = load_config(CONFIGS / "tiny.yaml", ["parallel.fp8.enabled=true", "parallel.fp8.amax_history_len=16"])
    assert cfg.parallel.fp8 == FP8Config(enabled=True, amax_history_len=16)
    assert load_config(CONFIGS / "tiny.yaml").parallel.fp8 == FP8Config()  # absent: off, defaults
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg  # the section round-trips


@pytest.mark.parametrize("old,new", [
    ("parallel.fp8=true", "parallel.fp8.enabled"),
    ("parallel.fp8_format=hybrid", "parallel.fp8.format"),
    ("parallel.fp8_recipe=delayed", "parallel.fp8.recipe"),
    ("parallel.fp8_amax_history_len=16", "parallel.fp8.amax_history_len"),
    ("parallel.fp8_amax_compute_algo=max", "parallel.fp8.amax_compute_algo"),
    ("parallel.fp8_margin=0", "parallel.fp8.margin"),
    ("parallel.fp8_bf16_layers=1", "parallel.fp8.bf16_layers"),
])  # fmt: skip
def test_flat_fp8_keys_name_the_new_key(tmp_path, old, new):
    key, _, value = old.partition("=")
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [old])
    assert f"config key {key!r} was replaced by {new!r}" in str(err.value) and "\n" not in str(err.value)
    recipe = tmp_path / "old.yaml"  # the same key in a YAML recipe
    recipe.write_text(f"model:\n  preset: tiny\nparallel:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert f"config key {key!r} was replaced by {new!r}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override,needle", [
    ("parallel.fp8.format=e5m2", "parallel.fp8.format='e5m2' is invalid; use hybrid or e4m3"),
    ("parallel.fp8.enabled=yes please", "parallel.fp8.enabled='yes please' is invalid; it must be true or false"),
    ("parallel.fp8.formt=hybrid", "unknown config key 'parallel.fp8.formt'; did you mean 'parallel.fp8.format'?"),
    ("parallel.fp8.margin=-1", "parallel.fp8.margin=-1 is invalid"),
])  # fmt: skip
def test_bad_fp8_values(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_flat_fp8_key_is_exit_2_in_the_cli(tmp_path, capsys):
    from megatron_elastic import cli

    assert cli.main(["train", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "parallel.fp8_format=hybrid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'parallel.fp8_format' was replaced by 'parallel.fp8.format'" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("uri", [
    "https://alice:pa55w0rd@mlflow.example.com:5000", "https://mlflow.example.com/api?access_token=AbC9xYz&run=1",
])  # fmt: skip
def test_written_config_holds_no_credentials(uri):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"tracking.mlflow_uri={uri}"])
    text = dump_config(cfg)
    assert "pa55w0rd" not in text and "AbC9xYz" not in text and "***" in text
    back = config_from_dict(yaml.safe_load(text))
    assert back.tracking.mlflow_uri == uri.replace("alice:pa55w0rd", "***").replace("AbC9xYz", "***")
    assert dataclasses.replace(back, tracking=cfg.tracking) == cfg  # nothing else changes


@pytest.mark.parametrize("override", ["train.params_dtype=bfloat16", "parallel.distributed_optimizer=true"])
def test_single_process_trainer_refuses_megatron_core_optimizer_settings(tmp_path, override):
    from megatron_elastic.training.trainer import Trainer

    cfg = load_config(CONFIGS / "tiny.yaml", [override, "train.device=cpu", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"needs megatron-core's optimizer in the parallel trainer: run it with "
                                          r"launch/train.py") as err:  # fmt: skip
        Trainer(cfg, data=None)  # before the model is built
    assert "\n" not in str(err.value)
    assert load_config(CONFIGS / "tiny.yaml", ["train.params_dtype=auto"]).train.params_dtype == "auto"


def test_params_dtype_auto_is_bfloat16_on_cuda_only():
    import torch

    from megatron_elastic.training.trainer import resolve_params_dtype

    assert resolve_params_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_params_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_params_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_params_dtype("float32", torch.device("cuda")) == torch.float32
