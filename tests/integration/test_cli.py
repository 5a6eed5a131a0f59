"""The command line as a user runs it: real subprocesses of the installed console script.

Every user error must print exactly one line on stderr, exit with code 2 and write nothing.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_user_error, cli
from reference import randomize_
from transformers import NemotronHConfig, NemotronHForCausalLM

from megatron_elastic.convert import load_native
from megatron_elastic.model import preset
from megatron_elastic.version import __version__


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model"
    cfg = NemotronHConfig(
        vocab_size=128, hidden_size=32, layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
        mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    randomize_(NemotronHForCausalLM(cfg)).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    return path


def test_help_and_version(cli_exe):
    r = cli(cli_exe, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"megatron-elastic {__version__}"
    r = cli(cli_exe, "--help")
    assert r.returncode == 0
    for command in ("convert", "info", "demo"):
        assert command in r.stdout
    r = cli(cli_exe, "convert", "from-hf", "--help")
    assert r.returncode == 0 and "SRC" not in r.stderr and "--dtype" in r.stdout


def test_round_trip_is_bit_identical(cli_exe, hf_dir, tmp_path):
    r = cli(cli_exe, "convert", "from-hf", str(hf_dir), str(tmp_path / "native"))
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout
    r = cli(cli_exe, "convert", "to-hf", str(tmp_path / "native"), str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "native" / "tokenizer_config.json").is_file()
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    from safetensors.torch import load_file

    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    before = {k.replace("model.", "backbone.", 1): v for k, v in before.items()}  # either prefix is valid
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_convert_casts_dtype(cli_exe, native_dir, tmp_path):
    r = cli(cli_exe, "convert", "to-hf", str(native_dir), str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = NemotronHForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.lm_head.weight.float(), load_native(native_dir).output_layer.weight,
                               rtol=1e-2, atol=1e-2)  # fmt: skip


def test_info(cli_exe, native_dir, hf_dir):
    r = cli(cli_exe, "info", "tiny")
    assert r.returncode == 0 and "854,472" in r.stdout
    r = cli(cli_exe, "info", str(native_dir), "--per-layer")
    assert r.returncode == 0 and "layer   3 attention" in r.stdout
    r = cli(cli_exe, "info", str(hf_dir))
    assert r.returncode == 0 and "pattern M-*-" in r.stdout


# ---------------------------------------------------------------------- user errors
def _hf_copy(hf_dir, tmp_path, **config_changes):
    dst = tmp_path / "src"
    shutil.copytree(hf_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_malformed_pattern(cli_exe, native_dir, hf_dir, tmp_path):
    src = tmp_path / "native"
    shutil.copytree(native_dir, src)
    meta = json.loads((src / "megatron_elastic.json").read_text())
    meta["model"]["pattern"] = "M-X*"
    (src / "megatron_elastic.json").write_text(json.dumps(meta))
    assert_user_error(cli(cli_exe, "convert", "to-hf", str(src), str(tmp_path / "out")),
                      "unknown symbol 'X' at position 2", tmp_path / "out")  # fmt: skip
    hf = _hf_copy(hf_dir, tmp_path, hybrid_override_pattern="M-?-")
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["layers_block_type"]
    (hf / "config.json").write_text(json.dumps(cfg))
    assert_user_error(cli(cli_exe, "convert", "from-hf", str(hf), str(tmp_path / "out2")),
                      "symbols ['?'] are not supported", tmp_path / "out2")  # fmt: skip


def test_mamba_heads_not_divisible_by_groups(cli_exe, hf_dir, tmp_path):
    src = _hf_copy(hf_dir, tmp_path, mamba_num_heads=6, n_groups=4)
    assert_user_error(cli(cli_exe, "convert", "from-hf", str(src), str(tmp_path / "out")),
                      "mamba_num_heads=6 is not divisible by model.mamba_num_groups=4", tmp_path / "out")  # fmt: skip


def test_query_heads_not_divisible_by_kv_heads(cli_exe, hf_dir, tmp_path):
    src = _hf_copy(hf_dir, tmp_path, num_attention_heads=6, num_key_value_heads=4)
    assert_user_error(cli(cli_exe, "convert", "from-hf", str(src), str(tmp_path / "out")),
                      "num_attention_heads=6 is not divisible by model.num_query_groups=4", tmp_path / "out")  # fmt: skip


def test_unknown_layer_types_rejected(cli_exe, hf_dir, tmp_path):
    src = _hf_copy(hf_dir, tmp_path, layers_block_type=["linear_attention", "gated_delta", "full_attention", "mlp"])
    assert_user_error(cli(cli_exe, "convert", "from-hf", str(src), str(tmp_path / "out")),
                      "layer types ['gated_delta'] are not supported", tmp_path / "out")  # fmt: skip


def test_unsupported_activation_and_model_type(cli_exe, hf_dir, tmp_path):
    src = _hf_copy(hf_dir, tmp_path, mlp_hidden_act="gelu")
    assert_user_error(cli(cli_exe, "convert", "from-hf", str(src), str(tmp_path / "out")),
                      "mlp_hidden_act='gelu' is not supported", tmp_path / "out")  # fmt: skip
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    assert_user_error(cli(cli_exe, "convert", "from-hf", str(other), str(tmp_path / "out")),
                      "model_type is 'llama', expected 'nemotron_h'", tmp_path / "out")  # fmt: skip


def test_missing_checkpoint_files(cli_exe, hf_dir, native_dir, tmp_path):
    src = _hf_copy(hf_dir, tmp_path)
    (src / "model.safetensors").unlink()
    assert_user_error(cli(cli_exe, "convert", "from-hf", str(src), str(tmp_path / "out")),
                      "no model.safetensors", tmp_path / "out")  # fmt: skip
    nat = tmp_path / "native"
    shutil.copytree(native_dir, nat)
    (nat / "model.safetensors").unlink()
    assert_user_error(cli(cli_exe, "convert", "to-hf", str(nat), str(tmp_path / "out")),
                      "model.safetensors' is missing", tmp_path / "out")  # fmt: skip
    assert_user_error(cli(cli_exe, "convert", "to-hf", str(tmp_path / "nowhere"), str(tmp_path / "out")),
                      "megatron_elastic.json' is missing", tmp_path / "out")  # fmt: skip


@pytest.mark.parametrize("keep_fraction", [0.5, 0.001])
def test_truncated_checkpoint(cli_exe, native_dir, tmp_path, keep_fraction):
    src = tmp_path / "native"
    shutil.copytree(native_dir, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    assert_user_error(cli(cli_exe, "convert", "to-hf", str(src), str(tmp_path / "out")),
                      "truncated or corrupt", tmp_path / "out")  # fmt: skip


def test_corrupt_metadata(cli_exe, native_dir, tmp_path):
    src = tmp_path / "native"
    shutil.copytree(native_dir, src)
    text = (src / "megatron_elastic.json").read_text()
    (src / "megatron_elastic.json").write_text(text[: len(text) // 2])
    assert_user_error(cli(cli_exe, "convert", "to-hf", str(src), str(tmp_path / "out")),
                      "is not valid JSON", tmp_path / "out")  # fmt: skip


def test_weights_from_another_model(cli_exe, native_dir, tmp_path):
    src = tmp_path / "native"
    shutil.copytree(native_dir, src)
    meta = json.loads((src / "megatron_elastic.json").read_text())
    meta["model"]["ffn_hidden_size"] += 8
    (src / "megatron_elastic.json").write_text(json.dumps(meta))
    assert_user_error(cli(cli_exe, "convert", "to-hf", str(src), str(tmp_path / "out")),
                      "the config and the weights come from different models", tmp_path / "out")  # fmt: skip


def test_existing_output_is_not_touched(cli_exe, native_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli(cli_exe, "convert", "to-hf", str(native_dir), str(out))
    assert r.returncode == 2 and "already exists; choose a new path or pass --overwrite" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = cli(cli_exe, "convert", "to-hf", str(native_dir), str(out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_bad_arguments_exit_2(cli_exe):
    r = cli(cli_exe, "convert", "sideways")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = cli(cli_exe, "info", "no-such-thing")
    assert r.returncode == 2 and "neither a preset" in r.stderr


def test_demo(cli_exe, tmp_path):
    """The README's main job, shortened: every stage runs and its checks pass."""
    r = cli(cli_exe, "demo", "--out", str(tmp_path / "demo"), "train.max_steps=40", "data.seq_len=64",
            "data.builtin_max_mb=0.5", "train.eval_interval=0", "train.save_interval=0",
            "--elastic-set", "train.max_steps=4", "--elastic-set", "train.eval_interval=0",
            "--elastic-set", "train.save_interval=0", "--elastic-set", "elastic.router_warmup_steps=100")  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo passed" in r.stdout
    table = r.stdout.split("[5/5] budgets")[1].splitlines()
    rows = [line.split() for line in table if line.strip().endswith(("-", "*", "M")) and "%" in line]
    assert [row[0] for row in rows] == ["100%", "75%", "50%"]
    params = [int(row[1].replace(",", "")) for row in rows]
    assert params[0] == 854_472 and params[0] > params[1] > params[2]
    assert abs(params[2] / params[0] - 0.5) <= 0.05 and abs(params[1] / params[0] - 0.75) <= 0.05
    assert (tmp_path / "demo" / "children" / "budget-0.5" / "model.safetensors").is_file()


def test_tools_scripts(native_dir, tmp_path):
    import sys

    from megatron_elastic.model import num_parameters

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "tools" / "inspect_checkpoint.py"), str(native_dir)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"total parameters: {sum(num_parameters(preset('tiny')).values()):,}" in r.stdout
    r = subprocess.run([sys.executable, str(root / "tools" / "convert_checkpoint.py"), "to-hf", str(native_dir),
                        str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()


def test_profile_writes_a_latency_table(cli_exe, tmp_path):
    out = tmp_path / "latency.json"
    r = cli(cli_exe, "profile", "tiny", "--out", str(out), "--seq-len", "16", "--repeats", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert table["hidden_size"] == 128
    for kind in ("M", "*", "-"):
        assert table[kind] and all(v > 0 for v in table[kind].values())
    r = cli(cli_exe, "profile", "tiny", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
