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


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """The built-in tokenizer and dataset cache (``data.cache_dir``) of the whole session: each corpus
    size is tokenized once (its files are named after the vocabulary and size, so tests share them).
    Tests about data preparation itself use a fresh directory."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> Path:
    """The tiny preset with random non-trivial weights, as a native model directory."""
    from helpers import save_parent

    from megatron_elastic.model import preset

    return save_parent(tmp_path_factory.mktemp("native") / "model", preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def tiny_parent_dir(tmp_path_factory) -> Path:
    """The tiny preset with random weights and a depth ranking beside it, as `importance` writes them."""
    from helpers import save_parent

    from megatron_elastic.model import preset

    root = tmp_path_factory.mktemp("importance")
    return save_parent(root / "parent", preset("tiny"), seed=0, depth_order=[3, 1, 6, 4, 2, 5, 0])
