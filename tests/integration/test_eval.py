"""The evaluation harness and `megatron-elastic eval`: metrics against independent references,
one-line errors before any compute."""

import itertools
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from manyinone_helpers import BUDGETS, write_many_in_one

from megatron_elastic.cli import main as cli_main
from megatron_elastic.elastic import ElasticSpace, child_config, extract, hard_state, homogeneous
from megatron_elastic.elastic.costs import memory, one_hot
from megatron_elastic.errors import UserError
from megatron_elastic.eval.baselines import depth_only_architecture
from megatron_elastic.eval.metrics import inference_memory, token_byte_lengths
from megatron_elastic.eval.shift import shift_batches, shift_files
from megatron_elastic.model import num_parameters, preset

DATA = ["data.builtin_max_mb=0.3", "data.seq_len=32"]


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    dst = tmp_path_factory.mktemp("ckpt") / "many-in-one"
    return write_many_in_one(dst)


def _cli(argv, capsys):
    rc = cli_main(argv)
    return rc, capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "loss,bogus"], "unknown task 'bogus'; the tasks are loss, recall, shift, sample"),
    (["--budgets", "0.3"], "budget 0.3 is not in the checkpoint; it holds 1, 0.75, 0.5"),
    (["--budgets", "half"], "'half' is not a number"),
    (["--set", "shift_data=/nonexistent/licenses"], "shifted-domain text '/nonexistent/licenses' does not exist"),
    (["--set", "mqar.num_pairs=99"], "mqar.num_pairs=99 exceeds mqar.num_keys=64"),
    (["--set", "mqar.value_offset=500"], "mqar ids reach 563 but the model's vocabulary has 512 tokens"),
    (["--set", "batchez=3"], "unknown study key 'eval.batchez'; did you mean 'eval.batches'?"),
])  # fmt: skip
def test_eval_errors_are_one_line_before_compute(many, tmp_path, cache, capsys, extra, message):
    out = tmp_path / "out"
    rc, cap = _cli(["eval", "--checkpoint", str(many[0]), "--out", str(out), *extra, f"data.cache_dir={cache / 'x'}", *DATA],
                   capsys)  # fmt: skip
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], cap.err
    assert not out.exists() and not (cache / "x").exists()  # nothing written, the corpus not even tokenized


def test_eval_missing_checkpoint(tmp_path, capsys):
    rc, cap = _cli(["eval", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not exist" in cap.err and len(cap.err.strip().splitlines()) == 1


def test_eval_every_budget_against_references(many, tmp_path, cache, capsys):
    from megatron_elastic.config import load_config
    from megatron_elastic.data.tokenizer import load_tokenizer
    from megatron_elastic.eval.mqar import MQARConfig, accuracy
    from megatron_elastic.training.data_setup import build_training_data

    ckpt, parent, archs = many
    out = tmp_path / "out"
    rc, cap = _cli(["eval", "--checkpoint", str(ckpt), "--out", str(out), "--tasks", "all", "--set", "batches=2",
                    "--set", "batch_size=2", "--set", "mqar_batches=1", "--set", "mqar_batch_size=8",
                    "--set", "latency_len=16", "--set", "latency_repeats=2", "--set", "sample_tokens=5",
                    "--set", "memory_context=1024", f"data.cache_dir={cache}", *DATA], capsys)  # fmt: skip
    assert rc == 0, cap.err
    payload = json.loads((out / "eval.json").read_text())
    results = payload["results"]
    assert list(results) == ["1", "0.75", "0.5"] and payload["tasks"] == ["loss", "recall", "shift", "sample"]
    md = (out / "eval.md").read_text()
    assert md.count("\n| 0.75 |") == 1 and "Greedy samples" in md

    cfg = load_config("tiny", [f"data.cache_dir={cache}", f"run_dir={tmp_path / 'r'}", *DATA])
    data = build_training_data(cfg, log=lambda m: None)
    from megatron_elastic.data.loader import PackedLoader

    valid = list(itertools.islice(PackedLoader(data.valid_dataset, micro_batch_size=2, shuffle=False), 2))
    tok = load_tokenizer("builtin", cache, 512)
    for (key, r), arch, budget in zip(results.items(), archs, BUDGETS):
        child_cfg = child_config(parent.config, arch)
        assert r["parameters"] == sum(num_parameters(child_cfg).values())
        # reference loss: the masked parent (the invariant masked == sliced), summed by hand
        state = hard_state(parent.config, arch)
        total = sum(F.cross_entropy(parent(t, elastic=state).flatten(0, 1), l.flatten(), reduction="sum").item()
                    for t, l in valid)  # fmt: skip
        n = sum(l.numel() for _, l in valid)
        assert r["loss"] == pytest.approx(total / n, rel=1e-5)
        # bits per byte: the same nats over the bytes of the decoded label text (ASCII windows decode exactly)
        nbytes = sum(len(tok.decode(row.tolist()).encode("utf-8")) for _, l in valid for row in l)
        assert r["bpb"] == pytest.approx(total / (math.log(2) * nbytes), rel=2e-2)
        assert r["memory_bytes"] == inference_memory(child_cfg, context=1024)["total"]
        assert r["latency_ms"] > 0 and r["shift_loss"] > 0 and r["shift_bpb"] > 0
        child = extract(parent, arch).eval()
        assert r["recall"] == accuracy(child, MQARConfig(), num_batches=1, batch_size=8, seed=777)
        assert r["sample"].startswith("def ") and len(tok.encode(r["sample"])) >= 2
    assert "[eval] wrote" in cap.out


def test_inference_memory_matches_the_router_cost():
    cfg = preset("tiny")
    space = ElasticSpace.from_sizes(cfg, {"hidden": [128, 96], "ffn": [384, 192], "attn_heads": [4, 2],
                                          "mamba_heads": [8, 4], "mamba_head_dim": [32, 16], "depth": [7, 5]},
                                    depth_order=[3, 6, 0, 1, 2, 4, 5])  # fmt: skip
    for idx in ({}, {"hidden": 1, "ffn": 1, "attn_heads": 1, "mamba_heads": 1, "mamba_head_dim": 1, "depth": 1},
                {"mamba_heads": 1, "depth": 1}):  # fmt: skip
        indices = {a: idx.get(a, 0) for a in space.axes}
        arch = space.architecture(indices)
        want = memory(space, one_hot(space, indices, torch.float64), bytes_per_param=2, batch=3, context=4096)
        got = inference_memory(child_config(cfg, arch), context=4096, batch=3, bytes_per_element=2)
        assert got["total"] == round(float(want))
        assert got["weights"] == 2 * sum(num_parameters(child_config(cfg, arch)).values())


def test_token_byte_lengths_spell_the_text(cache):
    from megatron_elastic.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin", cache, 512)
    lengths = token_byte_lengths(tok)
    assert lengths[tok.eod_id] == 0
    for text in ("def f(x):\n    return x  # é, ü, 漢字 and an emoji 🙂\n", "GNU GENERAL PUBLIC LICENSE\n  Version 3"):
        ids = tok.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_shift_files_skip_links_and_duplicates(tmp_path, cache):
    from megatron_elastic.data.tokenizer import load_tokenizer

    (tmp_path / "b.txt").write_text("the second text " * 40)
    (tmp_path / "a.txt").write_text("the first text " * 40)
    os.symlink(tmp_path / "a.txt", tmp_path / "c-link")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in shift_files(tmp_path)] == ["a.txt", "b.txt"]
    with pytest.raises(UserError, match="does not exist"):
        shift_files(tmp_path / "missing")
    empty = tmp_path / "sub"
    with pytest.raises(UserError, match="holds no regular files"):
        shift_files(empty)
    tok = load_tokenizer("builtin", cache, 512)
    batches = shift_batches(tmp_path, tok, seq_len=16, batch_size=2, num_batches=100)
    stream = tok.encode((tmp_path / "a.txt").read_text()) + [tok.eod_id] + tok.encode((tmp_path / "b.txt").read_text()) + [tok.eod_id]
    assert len(batches) == ((len(stream) - 1) // 16) // 2
    for b, (t, l) in enumerate(batches):
        for r in range(2):
            start = (2 * b + r) * 16
            assert t[r].tolist() == stream[start : start + 16] and l[r].tolist() == stream[start + 1 : start + 17]
    with pytest.raises(UserError, match="fewer than one batch"):
        shift_batches(tmp_path, tok, seq_len=4096, batch_size=2, num_batches=1)


def test_depth_only_drops_least_influential_until_within_budget():
    cfg = preset("tiny")
    influence = [0.9, 0.05, 0.5, 0.3, 0.01, 0.7, 0.2]
    full = sum(num_parameters(cfg).values())
    for budget in (1.0, 0.75, 0.5):
        arch, dropped = depth_only_architecture(cfg, influence, budget, tolerance=0.05)
        # reference: walk the influence order by hand
        order = sorted(range(7), key=lambda i: influence[i])
        ref = []
        while sum(num_parameters(child_config(cfg, homogeneous(cfg, drop_layers=tuple(ref)))).values()) > budget * full * 1.05:
            ref.append(order[len(ref)])
        assert dropped == sorted(ref)
        assert [i for i, layer in enumerate(arch.layers) if not layer.keep] == sorted(ref)
    _, kept_attention = depth_only_architecture(cfg, [0.0] * 7, 0.3, protect_attention=True)
    assert 3 not in kept_attention  # the attention layer (index 3 of M-M*-M-) is never dropped when protected


def test_greedy_sample_of_an_extracted_child_equals_full_sequence_decoding(many):
    from megatron_elastic.inference import greedy_generate

    _, parent, archs = many
    child = extract(parent, archs[2]).eval()  # every axis trimmed and one layer dropped
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    cached = greedy_generate(child, prompt, 9, use_cache=True)
    full = greedy_generate(child, prompt, 9, use_cache=False)
    assert torch.equal(cached, full) and cached.shape == (2, 16)
