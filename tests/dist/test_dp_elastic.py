"""Elastic nested distillation at DP=2 (torchrun, gloo) reproduces the single-process trace: the
budgets and Gumbel noise follow the global micro-batch, the router's gradients are averaged over
ranks, and only one rank writes metrics and the many-in-one checkpoint."""

import pytest
from launching import single, torchrun, train_records


RTOL, ATOL = 1e-5, 1e-6
ARGS = ["--config", "elastic-tiny", "data.seq_len=64", "data.builtin_max_mb=0.5", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.log_interval=1", "train.eval_batches=2",
        "elastic.router_warmup_steps=150", "train.max_steps=3", "train.eval_interval=0"]  # fmt: skip


def test_elastic_dp2_matches_single_process(tiny_parent_dir, tmp_path):
    cache = tmp_path / "cache"
    common = [*ARGS, f"elastic.parent={tiny_parent_dir}", f"data.cache_dir={cache}"]
    r = single(*common, f"run_dir={tmp_path / 'one'}")
    assert r.returncode == 0, r.stdout + r.stderr
    r = torchrun(2, *common, f"run_dir={tmp_path / 'dp2'}")
    assert r.returncode == 0, r.stdout + r.stderr
    want, got = train_records(tmp_path / "one"), train_records(tmp_path / "dp2")
    assert [x["step"] for x in got] == [1, 2, 3]
    for g, w in zip(got, want):
        assert set(g) == set(w)  # the same budgets were drawn
        assert any(k.startswith("kd_loss/b0.") for k in g)  # at least one masked budget trained
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=RTOL, abs=ATOL), (g["step"], key)
    for name in ("elastic.json", "router.safetensors", "model.safetensors"):  # written once, by the logging rank, after the last step
        assert (tmp_path / "dp2" / "many-in-one" / name).is_file()
