"""Shared pytest setup: the ``gpu`` marker skips without CUDA; small helpers as fixtures."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests run the real pure-PyTorch path unless a GPU test asks otherwise.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cli_exe() -> list[str]:
    """The installed console script, run as a real subprocess."""
    exe = Path(sys.executable).parent / "megatron-elastic"
    assert exe.exists(), f"console script missing at {exe}; install with `pip install -e .`"
    return [str(exe)]
