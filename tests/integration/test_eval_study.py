"""`megatron-elastic study` on the reduced recipe (configs/study-test.yaml): every stage, file,
table and plot of the real study, on a few steps; and its one-line errors before any compute.
Checks the pipeline and the token accounting, not the quality of the numbers."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "study-test.yaml"
METHODS = ("nested", "nested-protect", "separate", "one-shot", "depth-only", "scratch")


def _paths(tmp_path):
    return [f"work_dir={tmp_path / 'work'}", f"results={tmp_path / 'docs' / 'results.md'}",
            f"images={tmp_path / 'docs' / 'img'}"]  # fmt: skip


@pytest.mark.slow
def test_reduced_study_writes_tables_plots_and_equal_token_budgets(cli_exe, tmp_path):
    proc = subprocess.run([*cli_exe, "study", "--config", str(CONFIG), *_paths(tmp_path), "importance_batches=2"],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "work" / "results.json").read_text())
    rows = report["rows"]
    got = {(r["method"], r["budget"]) for r in rows}
    for m in METHODS:
        for b in (0.75, 0.5):
            assert (m, b) in got
    assert ("nested", 1.0) in got and ("nested-protect", 1.0) in got and ("parent", 1.0) in got
    for r in rows:
        for key in ("parameters", "memory_bytes", "latency_ms", "loss", "bpb", "shift_loss", "shift_bpb", "recall", "sample"):
            assert key in r, (r["name"], key)
        assert 0.0 <= r["recall"] <= 1.0 and r["loss"] > 0 and r["latency_ms"] > 0
    # the nested children, one-shot, separate and scratch share architectures; depth-only has its own
    by = {(r["method"], r["budget"]): r for r in rows}
    for b in (0.75, 0.5):
        assert len({by[(m, b)]["parameters"] for m in ("nested", "one-shot", "separate", "scratch")}) == 1
        assert by[("depth-only", b)]["hidden"] == by[("parent", 1.0)]["hidden"]  # whole layers only, no width cut
        assert by[("depth-only", b)]["param_fraction"] <= b * 1.05 + 1e-9
    # protect_attention keeps the attention layer and its heads in every child
    for b in (0.75, 0.5):
        assert "*" in by[("nested-protect", b)]["pattern"]
    # equal total tokens: the nested run's tokens split evenly over the two children
    t = report["tokens"]
    assert t["nested"] > 0 and t["separate"] == t["nested"] and t["scratch"] == t["separate"]
    assert t["one-shot"] == 0 and t["depth-only"] == 0
    md = (tmp_path / "docs" / "results.md").read_text()
    for section in ("## Headline", "## Every model", "## Tokens", "## Plots", "## Greedy samples", "## Setup"):
        assert section in md
    assert "budget 0.5: nested child" in md and "recall at budget 0.5: nested" in md
    for name in ("pareto.png", "recall.png", "tokens.png", "shift.png"):
        png = tmp_path / "docs" / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"](img/{name})" in md
    assert sum(1 for line in md.splitlines() if line.startswith("| 0.5 |")) == len(METHODS)


@pytest.mark.parametrize("extra, message", [
    (["baselines.methods=[one-shot,pruned]"], "unknown baseline 'pruned'; the baselines are one-shot, separate, depth-only, scratch"),
    (["eval.tasks=[loss,perplexity]"], "unknown eval task 'perplexity'"),
    (["eval.shift_data=/nonexistent/licenses"], "shifted-domain text '/nonexistent/licenses' does not exist"),
    (["recall.stepz=3"], "unknown study key 'recall.stepz'; did you mean 'recall.steps'?"),
    (["parent.overrides=[train.max_stepz=3]"], "unknown config key 'train.max_stepz'"),
    (["elastic.protect_attention=[true]"], "elastic.protect_attention must start with false"),
])  # fmt: skip
def test_study_errors_are_one_line_before_compute(tmp_path, capsys, extra, message):
    from megatron_elastic.cli import main as cli_main

    rc = cli_main(["study", "--config", str(CONFIG), *_paths(tmp_path), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "work").exists() and not (tmp_path / "docs").exists()


def test_missing_study_config(tmp_path, capsys):
    from megatron_elastic.cli import main as cli_main

    rc = cli_main(["study", "--config", str(tmp_path / "none.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
