"""Elastic nested distillation end to end: budgets met by the router, teacher run once per
micro-batch, many-in-one checkpoint, zero-shot extraction equal to the masked parent, exact resume,
user errors."""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_user_error, run

import megatron_elastic
from megatron_elastic.elastic import Architecture, hard_state

FAST = ["data.seq_len=64", "data.builtin_max_mb=0.5", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.warmup_steps=2", "train.log_interval=1", "train.eval_batches=2", "elastic.router_warmup_steps=150"]  # fmt: skip


def train_cmd(cli_exe, tiny_parent_dir, run_dir, cache, *extra):
    return [*cli_exe, "train", "--config", "elastic-tiny", f"elastic.parent={tiny_parent_dir}", f"run_dir={run_dir}",
            f"data.cache_dir={cache}", *FAST, *extra]  # fmt: skip


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def elastic_run(cli_exe, tiny_parent_dir, cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("elastic") / "run"
    r = run(train_cmd(cli_exe, tiny_parent_dir, run_dir, cache, "train.max_steps=8", "train.eval_interval=4",
                      "train.save_interval=4", "distill.stage2_start_step=4"))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir, r


def test_router_meets_every_budget(elastic_run):
    run_dir, r = elastic_run
    meta = json.loads((run_dir / "many-in-one" / "elastic.json").read_text())
    assert meta["budgets"] == [1.0, 0.75, 0.5]
    for budget, achieved in meta["achieved_cost_fraction"].items():
        assert abs(achieved / float(budget) - 1) <= 0.05, (budget, achieved)
    assert "stage 2 at step 4" in r.stdout
    recs = records(run_dir)
    train = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train] == list(range(1, 9))
    assert train[0]["tau"] == 1.0 and all(a["tau"] > b["tau"] for a, b in zip(train, train[1:]))
    assert any("kd_loss/b0.50" in x for x in train) and any("cost/b1.00" in x for x in train)
    val = [x for x in recs if "val_loss/b0.50" in x]
    assert [x["step"] for x in val] == [4, 8]
    last = [val[-1][f"val_loss/{t}"] for t in ("b1.00", "b0.75", "b0.50")]
    assert len(set(last)) == 3  # three different architectures, three different losses


def test_extract_all_equals_masked_parent(cli_exe, elastic_run, tmp_path):
    run_dir, _ = elastic_run
    ckpt = run_dir / "many-in-one"
    r = run([*cli_exe, "extract", "--checkpoint", str(ckpt), "--all", "--out", str(tmp_path / "children"),
             "--format", "hf"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    ratio = float(r.stdout.split(" bytes on disk = ")[1].split("x")[0])
    assert ratio <= 1.02
    parent = megatron_elastic.load_pretrained(ckpt)
    meta = json.loads((ckpt / "elastic.json").read_text())
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    from transformers import NemotronHForCausalLM

    sizes = []
    for key, arch_dict in meta["architectures"].items():
        arch = Architecture.from_dict(arch_dict)
        child = NemotronHForCausalLM.from_pretrained(tmp_path / "children" / f"budget-{key}").eval()
        with torch.no_grad():
            torch.testing.assert_close(child(tokens, use_cache=False).logits,
                                       parent(tokens, elastic=hard_state(parent.config, arch)),
                                       rtol=0, atol=2e-4)  # fmt: skip
        sizes.append(sum(p.numel() for p in child.parameters()))
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.55 * sizes[0]


def test_teacher_runs_once_per_micro_batch(tiny_parent_dir, cache, tmp_path):
    from megatron_elastic.config import load_config
    from megatron_elastic.tracking import MultiTracker
    from megatron_elastic.training.data_setup import build_training_data
    from megatron_elastic.training.elastic_trainer import ElasticTrainer
    from megatron_elastic.training.run import resolve_elastic_run

    cfg = load_config("elastic-tiny", [f"elastic.parent={tiny_parent_dir}", f"run_dir={tmp_path / 'run'}",
                                       f"data.cache_dir={cache}", *FAST, "train.max_steps=2", "train.eval_interval=0",
                                       "train.save_interval=0", "distill.budgets_per_micro_batch=0"])  # fmt: skip
    run = resolve_elastic_run(cfg)
    cfg = run.cfg
    trainer = ElasticTrainer(cfg, build_training_data(cfg, log=lambda m: None), depth_order=run.depth_order,
                             parent=megatron_elastic.load_pretrained(run.parent).train(), tracker=MultiTracker([]))  # fmt: skip
    calls = {"teacher": 0, "student": 0}
    trainer.teacher.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    trainer.model.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    router_before = [p.detach().clone() for p in trainer.router.parameters()]
    assert trainer.fit().exit_code == 0
    micro_batches = 2 * 2  # 2 steps x (global 8 / micro 4)
    assert calls["teacher"] == micro_batches
    # three budgets per micro-batch, plus the end-of-run validation of each budget (2 batches each)
    assert calls["student"] == 3 * micro_batches + 3 * 2
    assert any(not torch.equal(a, b) for a, b in zip(router_before, trainer.router.parameters()))
    assert all(not p.requires_grad for p in trainer.teacher.parameters())


def test_elastic_sigkill_resumes_exactly(cli_exe, tiny_parent_dir, cache, elastic_run, tmp_path):
    ref_dir, _ = elastic_run
    run_dir = tmp_path / "run"
    cmd = train_cmd(cli_exe, tiny_parent_dir, run_dir, cache, "train.max_steps=8", "train.eval_interval=4",
                    "train.save_interval=4", "distill.stage2_start_step=4")  # fmt: skip
    kill_at = random.Random(os.getpid()).randint(5, 6)  # after the step-4 checkpoint, well before step 8
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path = run_dir / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300:
        assert proc.poll() is None, proc.stderr.read()
        if path.exists() and any(json.loads(x).get("step", 0) >= kill_at for x in path.read_text().splitlines()
                                 if x.strip().endswith("}")):  # fmt: skip
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    r = run(cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming at step 4" in r.stdout
    assert records(run_dir) == records(ref_dir), f"killed at step {kill_at}"


def test_user_errors(cli_exe, tiny_parent_dir, cache, elastic_run, tmp_path):
    run_dir = tmp_path / "run"
    assert_user_error(run(train_cmd(cli_exe, tiny_parent_dir, run_dir, cache, "elastic.budgets=[1.0,0.5,0.1]")),
                      "elastic.budgets: 0.1 is out of reach")  # fmt: skip
    assert_user_error(run(train_cmd(cli_exe, tiny_parent_dir, run_dir, cache, "elastic.budgets=[1.0,1.2,0.5]")),
                      "every entry must be a fraction in (0, 1]")  # fmt: skip
    assert_user_error(run(train_cmd(cli_exe, tiny_parent_dir, run_dir, cache, "elastic.budgets=[0.75,0.5,0.4]")),
                      "must start with 1.0")  # fmt: skip
    assert_user_error(run(train_cmd(cli_exe, tmp_path / "nothing", run_dir, cache)), "not a native or Hugging Face model")
    assert not run_dir.exists()
    # resuming an elastic run with another space
    ref_dir, _ = elastic_run
    assert_user_error(run(train_cmd(cli_exe, tiny_parent_dir, ref_dir, cache, "train.max_steps=12",
                                    "elastic.ffn=[1.0,0.5]")),
                      "trained with another elastic space")  # fmt: skip
    # extraction errors
    ckpt = ref_dir / "many-in-one"
    assert_user_error(run([*cli_exe, "extract", "--checkpoint", str(ckpt), "--budget", "0.3", "--out", str(tmp_path / "x")]),
                      "budget 0.3 is not in this checkpoint")  # fmt: skip
    assert_user_error(run([*cli_exe, "extract", "--checkpoint", str(tiny_parent_dir), "--all",
                           "--out", str(tmp_path / "x")]),
                      "elastic.json")  # fmt: skip
    assert not (tmp_path / "x").exists()
