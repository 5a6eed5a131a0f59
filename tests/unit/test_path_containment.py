"""Names read from files never reach outside their directory: Hugging Face shard indexes and the budget
keys of a many-in-one checkpoint (which name extract's output folders)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_elastic.convert.hf import read_hf_weights
from megatron_elastic.elastic.manyinone import FORMAT, FORMAT_VERSION, read_metadata
from megatron_elastic.errors import CheckpointError


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/etc/passwd", "sub/../../outside/x.safetensors", 7, ""])
def test_shard_index_outside_the_directory_is_refused(tmp_path, shard):
    model, outside = tmp_path / "model", tmp_path / "outside"
    model.mkdir()
    outside.mkdir()
    save_file({"w": torch.ones(2)}, str(outside / "x.safetensors"))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match="points outside the directory|is not a file name") as info:
        read_hf_weights(model, dtype=None)
    assert "\n" not in str(info.value)


def test_shard_index_inside_the_directory_is_read(tmp_path):
    (tmp_path / "shards").mkdir()
    save_file({"w": torch.arange(3.0)}, str(tmp_path / "shards" / "a.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shards/a.safetensors"}}))
    torch.testing.assert_close(read_hf_weights(tmp_path, dtype=None)["w"], torch.arange(3.0))


def _many_in_one(path, keys):
    path.mkdir(parents=True)
    archs = {k: {"hidden": 64} for k in keys}
    (path / "elastic.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                   "architectures": archs}))  # fmt: skip


@pytest.mark.parametrize("key", ["x/../../../victim", "../0.5", "0.50", "nan", "2", ""])
def test_budget_keys_must_be_budgets(tmp_path, key):
    _many_in_one(tmp_path / "ckpt", ["1", key])
    with pytest.raises(CheckpointError, match="is not a budget fraction"):
        read_metadata(tmp_path / "ckpt")


def test_extract_all_refuses_an_escaping_budget_key_before_writing(tmp_path):
    _many_in_one(tmp_path / "run" / "ckpt", ["1", "x/../../../victim"])
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("unrelated")
    before = tree(tmp_path)
    r = subprocess.run([sys.executable, "-m", "megatron_elastic.cli", "extract", "--checkpoint",
                        str(tmp_path / "run" / "ckpt"), "--all", "--out", str(tmp_path / "run" / "out"), "--overwrite"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a budget fraction" in lines[0], r.stderr
    assert tree(tmp_path) == before
    assert (tmp_path / "victim" / "keep.txt").read_text() == "unrelated"
