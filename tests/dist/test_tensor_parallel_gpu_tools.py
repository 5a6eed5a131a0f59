"""The GPU tooling on a machine without a GPU: importable, and it fails loudly (never a silent pass)."""

import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_throughput_refuses_to_run_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: tools/gpu_check.sh runs the real thing")
    module = runpy.run_path(str(ROOT / "tools" / "gpu_throughput.py"), run_name="gpu_throughput")
    assert module["main"](["--out", str(tmp_path / "t.json")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_gpu_check_fails_loudly_without_a_gpu(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi exists here: tools/gpu_check.sh would run the real checks")
    report = tmp_path / "out" / "report.txt"
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(report)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = report.read_text().splitlines()
    assert lines[-1].startswith("gpu_check: FAIL")
    assert any("nvidia-smi not found" in line for line in lines)
