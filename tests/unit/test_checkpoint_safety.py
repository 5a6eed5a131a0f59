"""Checkpoint readers never run code from a file: a pickle whose ``__reduce__`` would act, planted in
each torch-saved file a single-process checkpoint holds, is refused with one line and does nothing;
a genuine checkpoint still round-trips exactly (optimizer moments and every RNG stream)."""

import os
import random
import shutil

import numpy as np
import pytest
import torch

from megatron_elastic.checkpoint import dist as dist_ckpt
from megatron_elastic.checkpoint import native as ckpt
from megatron_elastic.config import TrainConfig
from megatron_elastic.errors import CheckpointError
from megatron_elastic.model import HybridConfig, HybridLM
from megatron_elastic.training.trainer import build_optimizer

CFG = dict(pattern="M*-", vocab_size=31, hidden_size=16, ffn_hidden_size=24, num_attention_heads=2,
           num_query_groups=1, head_dim=8, mamba_num_heads=2, mamba_head_dim=8, mamba_num_groups=1,
           mamba_state_dim=4, mamba_chunk_size=8)  # fmt: skip


class Hostile:
    """Unpickling this creates ``marker``: what an attacker's checkpoint would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**CFG))
    optimizer = build_optimizer(model, TrainConfig())
    model(torch.randint(0, 31, (1, 9))).sum().backward()
    optimizer.step()
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    path = ckpt.save_checkpoint(tmp_path_factory.mktemp("ckpt"), step=1, model=model, optimizer=optimizer,
                                trainer_state={"step": 1}, config_yaml="{}\n", keep_last=2)  # fmt: skip
    return path, optimizer.state_dict(), ckpt.rng_state()


def fresh():
    model = HybridLM(HybridConfig(**CFG))
    return model, build_optimizer(model, TrainConfig())


def test_genuine_checkpoint_round_trips(checkpoint):
    path, opt_sd, rng = checkpoint
    model, optimizer = fresh()
    state, got_rng = dist_ckpt.load_checkpoint(path, model=model, optimizer=optimizer)
    assert state == {"step": 1}
    got = optimizer.state_dict()["state"]
    assert got.keys() == opt_sd["state"].keys() and len(got) > 10
    for k in got:
        torch.testing.assert_close(got[k]["exp_avg_sq"], opt_sd["state"][k]["exp_avg_sq"], rtol=0, atol=0)
    assert got_rng["python"] == rng["python"]
    assert np.array_equal(got_rng["numpy"][1], rng["numpy"][1]) and got_rng["numpy"][2:] == rng["numpy"][2:]
    assert torch.equal(got_rng["torch"], rng["torch"])


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "inside-a-dict"])
def test_hostile_pickle_is_refused_and_never_runs(checkpoint, tmp_path, name, wrapped):
    path = tmp_path / "step"
    shutil.copytree(checkpoint[0], path)
    marker = tmp_path / "pwned"
    payload = Hostile(marker)
    torch.save({"state": {0: payload}, "param_groups": []} if wrapped else payload, path / name)
    model, optimizer = fresh()
    with pytest.raises(CheckpointError) as err:
        dist_ckpt.load_checkpoint(path, model=model, optimizer=optimizer)
    message = str(err.value)
    assert "\n" not in message and name in message and "could run code" in message, message
    assert not marker.exists(), "the checkpoint ran code"


def test_garbage_optimizer_file_is_one_line(checkpoint, tmp_path):
    path = tmp_path / "step"
    shutil.copytree(checkpoint[0], path)
    (path / "optimizer.pt").write_bytes(b"\x80\x04not a pickle at all")
    model, optimizer = fresh()
    with pytest.raises(CheckpointError) as err:
        dist_ckpt.load_checkpoint(path, model=model, optimizer=optimizer)
    assert "\n" not in str(err.value) and "optimizer.pt" in str(err.value) and "corrupt" in str(err.value)


def test_prune_at_start_up_keeps_the_checkpoint_resumed(tmp_path):
    """At start-up, pruning finishes an interrupted save only when the run resumes from the newest
    checkpoint; after a fall-back to an older one nothing is deleted (counting the damaged newer ones
    must not remove the one resumed)."""
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        (root / ckpt.step_dirname(step)).mkdir(parents=True)
    (root / ".step_00000012.tmp-7").mkdir()
    ckpt.prune_checkpoints(root, 1, resumed=root / ckpt.step_dirname(3))  # fell back past 6 and 9
    assert sorted(p.name for p in root.iterdir()) == [".step_00000012.tmp-7", "step_00000003", "step_00000006",
                                                      "step_00000009"]  # fmt: skip
    ckpt.prune_checkpoints(root, 2, resumed=root / ckpt.step_dirname(9))
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006", "step_00000009"]
