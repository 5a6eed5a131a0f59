"""Extraction as a user runs it: `megatron-elastic prune`, Hugging Face export of children."""

import json

import pytest
import torch
from helpers import cli, save_parent
from reference import randomize_
from transformers import NemotronHForCausalLM

import megatron_elastic
from megatron_elastic.convert import save_native
from megatron_elastic.elastic import Architecture, extract, hard_state, homogeneous
from megatron_elastic.model import HybridConfig, HybridLM

PARENT = dict(
    pattern="M*-M-*M-", vocab_size=97, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6,
    num_query_groups=2, head_dim=10, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=2,
    mamba_state_dim=4, mamba_chunk_size=8,
)  # fmt: skip
TOL = 2e-4


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parent") / "model"
    return save_parent(path, HybridConfig(**PARENT), seed=5, depth_order=[4, 1, 6, 0, 2, 3, 5, 7], ranking_dir=path)


def masked_logits(parent, arch, tokens):
    with torch.no_grad():
        return parent(tokens, elastic=hard_state(parent.config, arch))


def test_prune_to_hf_loads_in_transformers(cli_exe, parent_dir, tmp_path):
    r = cli(cli_exe, "prune", "--checkpoint", str(parent_dir), "--out", str(tmp_path / "child"), "--hidden", "0.5",
            "--ffn", "0.5", "--attn-heads", "4", "--mamba-heads", "0.5", "--mamba-head-dim", "4", "--layers", "6",
            "--format", "hf")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "pattern M-M*M-" in r.stdout  # layers 4 and 1 (first in the depth order) dropped
    arch = Architecture.from_dict(json.loads((tmp_path / "child" / "architecture.json").read_text()))
    assert arch.hidden_size == 24 and [i for i, layer in enumerate(arch.layers) if not layer.keep] == [1, 4]
    hf = NemotronHForCausalLM.from_pretrained(tmp_path / "child").eval()
    assert hf.config.hidden_size == 24 and hf.config.mamba_num_heads == 4 and hf.config.num_attention_heads == 4
    parent = megatron_elastic.load_pretrained(parent_dir)
    tokens = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, masked_logits(parent, arch, tokens), rtol=0, atol=TOL)


def test_prune_native_equals_masked_parent(cli_exe, parent_dir, tmp_path):
    r = cli(cli_exe, "prune", "--checkpoint", str(parent_dir), "--out", str(tmp_path / "child"), "--ffn", "16",
            "--drop-layers", "0", "7")  # fmt: skip
    assert r.returncode == 0, r.stderr
    child = megatron_elastic.load_pretrained(tmp_path / "child")
    parent = megatron_elastic.load_pretrained(parent_dir)
    arch = homogeneous(parent.config, ffn=16, drop_layers=(0, 7))
    tokens = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(child(tokens), masked_logits(parent, arch, tokens), rtol=0, atol=TOL)


def test_heterogeneous_child_exports_natively_not_to_hf(tmp_path):
    torch.manual_seed(1)
    parent = randomize_(HybridLM(HybridConfig(**PARENT)), seed=1).eval()
    arch = homogeneous(parent.config)
    layers = list(arch.layers)
    layers[2] = type(layers[2])(kind="-", ffn_hidden_size=16)  # one MLP layer smaller than the other
    arch = Architecture(hidden_size=48, layers=tuple(layers))
    child = extract(parent, arch)
    assert child.config.is_heterogeneous and child.config.ffn_hidden_size_per_layer == [16, 64, 64]
    from megatron_elastic.convert import save_hf
    from megatron_elastic.errors import CheckpointError

    with pytest.raises(CheckpointError, match="heterogeneous model .* cannot be expressed in nemotron_h"):
        save_hf(child, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    save_native(child, tmp_path / "native")
    back = megatron_elastic.load_pretrained(tmp_path / "native")
    tokens = torch.randint(0, 97, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), masked_logits(parent, arch, tokens), rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--hidden", "64"], "hidden size 64 exceeds the parent's 48"),
        (["--mamba-heads", "3"], "mamba_heads size 3 is not divisible by the 2 groups"),
        (["--hidden", "1.5"], "is not a fraction in (0, 1]"),
        (["--ffn", "half"], "is not a number"),
        (["--drop-layers", *map(str, range(8))], "drops every layer"),
        (["--drop-layers", "9"], "cannot drop layer 9"),
        (["--layers", "9"], "--layers 9 must be between 1 and the parent's 8 layers"),
        (["--layers", "3", "--ranking", "/nonexistent.json"], "does not exist; run `megatron-elastic importance`"),
    ],
)
def test_prune_user_errors(cli_exe, parent_dir, tmp_path, args, needle):
    r = cli(cli_exe, "prune", "--checkpoint", str(parent_dir), "--out", str(tmp_path / "child"), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "child").exists()
