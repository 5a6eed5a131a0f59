"""``megatron-elastic importance`` as a user runs it: a real subprocess of the console script on a
tiny checkpoint with a small calibration set."""

import json
import subprocess

import pytest
import torch
from helpers import assert_user_error, cli
from reference import randomize_

from megatron_elastic.convert import load_native, save_native
from megatron_elastic.elastic.importance import Ranking, depth_random
from megatron_elastic.model import HybridConfig, HybridLM, preset

# The model computes in fp32 and a permutation reorders fp32 reductions: measured ~2e-5 on logits O(5).
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def small_data(cache):
    return ["--batches", "2", "--batch-size", "2", "--seq-len", "32", "data.builtin_max_mb=0.3",
            f"data.cache_dir={cache}"]  # fmt: skip


def test_importance_writes_a_permuted_parent_with_the_same_function(cli_exe, native_dir, small_data, tmp_path):
    out = tmp_path / "imp"
    r = cli(cli_exe, "importance", "--checkpoint", str(native_dir), "--out", str(out), *small_data)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[importance] depth step 7/7" in r.stdout and "max |logit diff|" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["importance.md", "parent", "ranking.json"]

    original, permuted = load_native(native_dir).eval(), load_native(out / "parent").eval()
    ranking = Ranking.from_dict(json.loads((out / "ranking.json").read_text()))
    ranking.check(original.config)
    assert ranking.depth_method == "iterative-mse" and sorted(ranking.depth) == list(range(7))
    assert ranking.meta["tokens"] == 2 * 2 * 32
    assert torch.equal(permuted.embedding.weight, original.embedding.weight[:, ranking.hidden])
    assert not torch.equal(permuted.embedding.weight, original.embedding.weight)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = original(tokens), permuted(tokens)
    assert before.abs().max() > 1.0
    torch.testing.assert_close(after, before, rtol=0, atol=LOGIT_TOL)
    reported = float(r.stdout.split("max |logit diff| = ")[1].split()[0])
    assert reported <= LOGIT_TOL

    report = (out / "importance.md").read_text()
    for needle in ("# Importance ranking", "## Hidden channels (128)", "### Layer 3 (attention)",
                   "## Depth (iterative-mse)", "## Permutation check"):  # fmt: skip
        assert needle in report, needle


def test_importance_from_hugging_face_with_random_depth(cli_exe, small_data, tmp_path):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    hf = tmp_path / "hf"
    cfg = NemotronHConfig(
        vocab_size=512, hidden_size=32, layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
        mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    randomize_(NemotronHForCausalLM(cfg)).save_pretrained(hf)
    out = tmp_path / "imp"
    r = cli(cli_exe, "importance", "--checkpoint", str(hf), "--out", str(out), "--depth-method", "random",
            "--seed", "3", *small_data)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    ranking = Ranking.from_dict(json.loads((out / "ranking.json").read_text()))
    assert ranking.depth == depth_random(4, 3)
    permuted = load_native(out / "parent").eval()
    original = NemotronHForCausalLM.from_pretrained(hf).eval()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(permuted(tokens), original(tokens).logits.float(), rtol=0, atol=LOGIT_TOL)


def test_user_errors_write_nothing(cli_exe, native_dir, small_data, tmp_path):
    out = tmp_path / "out"
    ok = ["--checkpoint", str(native_dir), "--out", str(out)]
    assert_user_error(cli(cli_exe, "importance", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)),
                      "does not exist", out)  # fmt: skip
    assert_user_error(cli(cli_exe, "importance", "--out", str(out)), "--checkpoint is required", out)
    assert_user_error(cli(cli_exe, "importance", *ok, "--batches", "0"), "--batches='0' is invalid", out)
    assert_user_error(cli(cli_exe, "importance", *ok, "--seq-len", "x"), "--seq-len='x' is invalid", out)
    assert_user_error(cli(cli_exe, "importance", *ok, "--depth-method", "perplexity"),
                      "--depth-method='perplexity' is unknown; use one of iterative-mse", out)  # fmt: skip
    assert_user_error(cli(cli_exe, "importance", *ok, "model.hidden_size=64"), "the model comes from --checkpoint", out)
    assert_user_error(cli(cli_exe, "importance", *ok, "data.sequence=3"), "unknown config key 'data.sequence'", out)
    assert_user_error(cli(cli_exe, "importance", *ok, "--config", str(tmp_path / "none.yaml")), "does not exist", out)
    small_vocab = tmp_path / "small-vocab"
    save_native(HybridLM(HybridConfig(**(preset("tiny").to_dict() | {"vocab_size": 256}))), small_vocab)
    assert_user_error(cli(cli_exe, "importance", "--checkpoint", str(small_vocab), "--out", str(out), *small_data),
                      "exceeds model.vocab_size=256", out)  # fmt: skip
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli(cli_exe, "importance", *ok, *small_data)
    assert r.returncode == 2 and "already exists; choose a new path or pass --overwrite" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
