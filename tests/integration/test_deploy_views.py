"""Zero-copy many-in-one inference: ElasticModel children are views of the parent's tensors and
compute what extracted children compute; generation from every budget; the generate command."""

import json
import subprocess

import pytest
import torch
from manyinone_helpers import BUDGETS, write_many_in_one

import megatron_elastic
from megatron_elastic.errors import CheckpointError
from megatron_elastic.inference import greedy_generate
from megatron_elastic.inference.elastic_model import ViewLinear, index_runs, view_child

# Logits are O(5); a view child sums a projection over column blocks, the copy in one GEMM (fp32).
TOL = dict(rtol=0, atol=5e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_many_in_one(tmp_path_factory.mktemp("mio") / "many-in-one")


@pytest.fixture(scope="module")
def elastic(ckpt):
    return megatron_elastic.ElasticModel.load(ckpt[0])


def tokens(batch=2, length=70, seed=0):  # longer than a scan chunk (64)
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def storages(model):
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_index_runs():
    assert index_runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]
    assert index_runs(torch.arange(4)) == [(0, 4)]


@pytest.mark.parametrize("budget", BUDGETS)
def test_view_child_equals_extracted_child(elastic, budget):
    view = elastic.at_budget(budget)
    copy = elastic.at_budget(budget, contiguous=True)
    assert view.config == copy.config
    assert view.num_parameters() == copy.num_parameters()
    with torch.no_grad():
        ref = copy(tokens())
        torch.testing.assert_close(view(tokens()), ref, **TOL)
    assert ref.abs().max() > 1.0
    # every matrix of the view child lives in the parent's storage; the copy shares nothing
    parent = storages(elastic.parent)
    matrices = [p for p in view.parameters() if p.dim() >= 2 and p.shape[-1] > 4]  # conv kernels (K=4) may be gathered
    assert matrices and all(p.untyped_storage().data_ptr() in parent for p in matrices)
    assert not storages(copy) & parent


def test_view_bytes_shared(ckpt):
    _, parent, archs = ckpt
    child, copied = view_child(parent, archs[2])
    total = sum(p.numel() * p.element_size() for p in child.parameters())
    own = sum(p.numel() * p.element_size() for p in child.parameters()
              if p.untyped_storage().data_ptr() not in storages(parent))  # fmt: skip
    assert own == copied  # only the reported small gathers are not views
    # gathered: depthwise conv kernels, norms and per-head vectors, O(width) against O(width^2) matrices
    # (1.1% of this tiny child; ~0.01% of a 12B one)
    assert 0 < copied < 0.02 * total
    kinds = {type(m) for m in child.modules()}
    assert ViewLinear in kinds  # grouped heads and trimmed head channels need block views
    # the budget-1.0 child is the parent itself, shared completely
    full, copied_full = view_child(parent, archs[0])
    assert copied_full == 0 and storages(full) <= storages(parent)


def test_view_child_follows_parent_updates(elastic):
    """Views, not copies: a change to the parent's weights shows in the child."""
    view = elastic.at_budget(0.5)
    w = elastic.parent.layers[0].mixer.in_proj.weight
    with torch.no_grad():
        before = view(tokens(1, 8))
        saved = w[0, 0].item()
        w[0, 0] += 1.0
        after = view(tokens(1, 8))
        w[0, 0] = saved
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("budget", [0.75, 0.5])
def test_generation_from_views_equals_extracted(elastic, budget):
    prompt = tokens(3, 6, seed=1)  # longer than the conv kernel, batch 3
    view_out = greedy_generate(elastic.at_budget(budget), prompt, 12)
    copy = elastic.at_budget(budget, contiguous=True)
    assert torch.equal(view_out, greedy_generate(copy, prompt, 12))
    assert torch.equal(view_out, greedy_generate(copy, prompt, 12, use_cache=False))


def test_unknown_budget(elastic):
    with pytest.raises(CheckpointError, match="budget 0.3 is not in this checkpoint; it holds 1, 0.75, 0.5"):
        elastic.at_budget(0.3)


def test_generate_command(cli_exe, ckpt, tmp_path):
    env = {"MEGATRON_ELASTIC_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    from megatron_elastic.data.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer(tmp_path / "cache", 512, train_bytes=200_000)
    (tok_file,) = (tmp_path / "cache").glob("builtin-bpe-512-*.json")  # a plain tokenizer.json
    prompt = "def main():\n    return"
    r = subprocess.run([*cli_exe, "generate", "--checkpoint", str(ckpt[0]), "--budget", "0.5", "--prompt", prompt,
                        "--max-new-tokens", "8", "--tokenizer", str(tok_file)],
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt)
    assert "budget 0.5" in r.stderr and "8 new tokens" in r.stderr
    # the same tokens as greedy_generate on the extracted child
    ids = tok.encode(prompt)
    copy = megatron_elastic.ElasticModel.load(ckpt[0]).at_budget(0.5, contiguous=True)
    out = greedy_generate(copy, torch.tensor([ids]), 8)
    assert r.stdout.rstrip("\n") == prompt + tok.decode(out[0, len(ids):].tolist())
    bad = subprocess.run([*cli_exe, "generate", "--checkpoint", str(ckpt[0]), "--budget", "0.3", "--prompt", "x",
                          "--tokenizer", str(tok_file)], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "budget 0.3 is not in this checkpoint" in bad.stderr
    meta = json.loads((ckpt[0] / "elastic.json").read_text())
    assert set(meta["architectures"]) == {"1", "0.75", "0.5"}
