"""MoE children cut out of a many-in-one MoE parent (tiny-moe, routed experts kept inside their routing
groups): ElasticModel view children equal extracted ones, homogeneous children export to nemotron_h
and load in transformers with equal logits and equal greedy generations (incremental decoding on
both sides), and a heterogeneous MoE budget is refused for the Hugging Face format in one line."""

import dataclasses
import json
import shutil

import pytest
import torch
from manyinone_helpers import MOE_BUDGETS, write_moe_many_in_one
from transformers import NemotronHForCausalLM

import megatron_elastic
from megatron_elastic.elastic import Architecture
from megatron_elastic.elastic.manyinone import extract_budgets
from megatron_elastic.errors import CheckpointError
from megatron_elastic.inference import greedy_generate
from megatron_elastic.model.config import active_parameters

TOL = dict(rtol=0, atol=1e-4)  # fp32, logits O(5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_moe_many_in_one(tmp_path_factory.mktemp("moe") / "many-in-one")


@pytest.fixture(scope="module")
def elastic(ckpt):
    return megatron_elastic.ElasticModel.load(ckpt[0])


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    lines = []
    out = extract_budgets(ckpt[0], tmp_path_factory.mktemp("hf"), all_budgets=True, fmt="hf", log=lines.append)
    return out, lines


def tokens(batch=2, length=70, seed=0):  # longer than a scan chunk (64)
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_extraction_table_names_the_experts_and_active_parameters(exported):
    out, lines = exported
    assert set(out) == {"1", "0.5"}
    row = next(line for line in lines if line.strip().startswith("0.5"))
    child = megatron_elastic.load_pretrained(out["0.5"])
    assert child.config.num_moe_experts == 4 and child.config.moe_router_topk == 2  # 2 experts per group
    assert f"experts=4x64 top2 shared=96 active={active_parameters(child.config):,}" in row


@pytest.mark.parametrize("budget", MOE_BUDGETS)
def test_view_child_equals_extracted_child(elastic, budget):
    view, copy = elastic.at_budget(budget), elastic.at_budget(budget, contiguous=True)
    assert view.config == copy.config
    with torch.no_grad():
        ref = copy(tokens())
        torch.testing.assert_close(view(tokens()), ref, rtol=0, atol=5e-5)
    assert ref.abs().max() > 1.0


@pytest.mark.parametrize("budget", MOE_BUDGETS)
def test_exported_child_loads_in_transformers_with_equal_logits_and_generations(elastic, exported, budget):
    out, _ = exported
    path = out["1" if budget == 1.0 else str(budget)]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["n_routed_experts"] == (8 if budget == 1.0 else 4) and cfg["n_group"] == 2
    hf = NemotronHForCausalLM.from_pretrained(path).eval()
    ours = elastic.at_budget(budget)
    with torch.no_grad():
        expected = hf(tokens()).logits
        torch.testing.assert_close(ours(tokens()), expected, **TOL)
    assert expected.abs().max() > 1.0
    prompt = tokens(2, 6, seed=1)
    theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False)  # transformers' cached decoding
    assert torch.equal(greedy_generate(ours, prompt, 10), theirs)
    assert torch.equal(greedy_generate(ours, prompt, 10, use_cache=False), theirs)


def test_heterogeneous_moe_budget_is_refused_for_hugging_face(ckpt, tmp_path):
    """nemotron_h has one expert count per model: a budget with per-layer expert counts stays native."""
    path, _, archs = ckpt
    copy = tmp_path / "many-in-one"
    shutil.copytree(path, copy)
    meta = json.loads((copy / "elastic.json").read_text())
    layers = list(archs[1].layers)
    layers[3] = dataclasses.replace(layers[3], num_moe_experts=6)  # M-ME*ME: layer 3 is the first MoE layer
    meta["architectures"]["0.5"] = Architecture(archs[1].hidden_size, tuple(layers)).to_dict()
    (copy / "elastic.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="heterogeneous model .* cannot be expressed in nemotron_h"):
        extract_budgets(copy, tmp_path / "out", budget="0.5", fmt="hf")
    assert not (tmp_path / "out").exists()
