"""Loading without whole copies, in one process: a parent read from its files on the meta-built model
(parallel.loading, TP=1), the teacher's cast copy (model.hybrid.cast_copy), and the errors of files
that do not match their config. The TP / PP shards are checked in tests/dist/test_sharded_load.py."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_elastic.api import load_pretrained
from megatron_elastic.errors import CheckpointError
from megatron_elastic.model.hybrid import cast_copy
from megatron_elastic.parallel.loading import load_shards


def test_single_rank_load_is_load_pretrained(native_dir):
    want = load_pretrained(native_dir)
    rng = torch.get_rng_state()
    for dtype in (torch.float32, torch.bfloat16):
        got = load_shards(native_dir, lambda m: m, dtype=dtype, device="cpu")
        for k, v in want.state_dict().items():
            assert torch.equal(got.state_dict()[k], v.to(dtype)), k
    assert torch.equal(torch.get_rng_state(), rng)  # building on the meta device draws no random numbers


def test_cast_copy_is_the_parent_in_another_dtype(native_dir):
    parent = load_pretrained(native_dir).train()
    rng = torch.get_rng_state()
    same, half = cast_copy(parent, torch.float32, "cpu"), cast_copy(parent, torch.bfloat16, "cpu")
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in parent.state_dict().items():
        assert torch.equal(same.state_dict()[k], v) and same.state_dict()[k].data_ptr() != v.data_ptr(), k
        assert half.state_dict()[k].dtype == torch.bfloat16 and torch.equal(half.state_dict()[k], v.to(torch.bfloat16)), k
    tokens = torch.randint(0, parent.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(same(tokens), parent(tokens))
    with torch.no_grad():  # a copy, not a view: training the parent leaves it alone
        next(parent.parameters()).add_(1.0)
    assert not torch.equal(next(same.parameters()), next(parent.parameters()))


@pytest.mark.parametrize("change, needle", [
    (lambda sd: sd.pop("final_norm.weight"), "missing 1 tensor(s) e.g. ['final_norm.weight']"),
    (lambda sd: sd.update({"final_norm.weight": torch.ones(3)}), "tensor 'final_norm.weight' has shape (3,)"),
])  # fmt: skip
def test_files_that_do_not_match_the_config(native_dir, tmp_path, change, needle):
    bad = tmp_path / "bad"
    shutil.copytree(native_dir, bad)
    state = load_file(bad / "model.safetensors")
    change(state)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_shards(bad, lambda m: m, dtype=torch.float32, device="cpu", what="elastic.parent")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_truncated_file(native_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(native_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_shards(bad, lambda m: m, dtype=torch.float32, device="cpu")
