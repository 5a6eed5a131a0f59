"""Helpers several test files share: subprocess runs, the one-line user-error contract, tiny parents
on disk, random heterogeneous architectures."""

import dataclasses
import json
import random
import subprocess
from pathlib import Path

from reference import randomize_

from megatron_elastic.convert.native import save_native
from megatron_elastic.elastic.space import Architecture, LayerArch, full_architecture
from megatron_elastic.model import HybridLM
from megatron_elastic.model.config import HybridConfig


def run(cmd: list[str], *, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """``cmd`` as a real subprocess, output captured as text."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def assert_user_error(result: subprocess.CompletedProcess, needle: str, *unwritten: Path) -> None:
    """The CLI's contract for bad input: exit code 2, one line on stderr naming the problem, no
    traceback, and none of ``unwritten`` (nor a temporary sibling of it) on disk."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("megatron-elastic: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    for path in unwritten:
        assert not path.exists(), f"{path} was written"
        assert not list(path.parent.glob(f".{path.name}.tmp-*")), "temporary directory left behind"


def save_parent(path: Path, config: HybridConfig, *, seed: int, depth_order: list[int] | None = None,
                ranking_dir: Path | None = None) -> Path:  # fmt: skip
    """A parent with non-trivial weights (``torch.manual_seed(0)`` then ``randomize_(seed)``) as a native
    directory; with ``depth_order`` a ranking.json in ``ranking_dir`` (default: beside the parent, as
    `importance` writes it)."""
    import torch

    torch.manual_seed(0)
    save_native(randomize_(HybridLM(config), seed=seed), path)
    if depth_order is not None:
        ranking = (path.parent if ranking_dir is None else ranking_dir) / "ranking.json"
        ranking.write_text(json.dumps({"depth": {"method": "given", "order": depth_order}}))
    return path


def random_arch(config: HybridConfig, rng: random.Random, *, ffn_multiple: int = 1,
                always_keep_first: bool = False) -> Architecture:  # fmt: skip
    """Every layer its own sizes (FFN widths multiples of ``ffn_multiple``, e.g. the TP size; head
    counts multiples of the groups), hidden size global, some layers dropped; layer 0 is kept when
    ``always_keep_first`` or when nothing else is."""
    layers = []
    for layer in full_architecture(config).layers:
        kw = dict(kind=layer.kind, keep=rng.random() > 0.25)
        if layer.kind == "-":
            kw["ffn_hidden_size"] = ffn_multiple * rng.randint(1, config.ffn_hidden_size // ffn_multiple)
        elif layer.kind == "*":
            kw["num_attention_heads"] = config.num_query_groups * rng.randint(1, 3)
        elif layer.kind == "E":
            groups = config.moe_router_num_groups
            kw["num_moe_experts"] = groups * rng.randint(2, config.num_moe_experts // groups)
            kw["moe_ffn_hidden_size"] = rng.randint(1, config.moe_ffn_hidden_size)
            kw["moe_shared_expert_intermediate_size"] = rng.randint(1, config.moe_shared_expert_intermediate_size)
            kw["moe_router_topk"] = rng.randint(1, config.moe_router_group_topk * kw["num_moe_experts"] // groups)
        else:
            kw["mamba_num_heads"] = config.mamba_num_groups * rng.randint(1, 4)
            kw["mamba_head_dim"] = rng.randint(1, config.mamba_head_dim)
        layers.append(LayerArch(**kw))
    if always_keep_first or not any(layer.keep for layer in layers):
        layers[0] = LayerArch(**(vars(layers[0]) | {"keep": True}))
    return Architecture(hidden_size=rng.randint(4, config.hidden_size), layers=tuple(layers))


def check_masked_equals_sliced(parent: HybridLM, arch: Architecture, tokens, tol: float):
    """The extracted child of ``arch`` computes what the masked parent does (to ``tol``), and its
    parameter count is the analytic one; returns (child, masked logits)."""
    import torch

    from megatron_elastic.elastic import extract, hard_state
    from megatron_elastic.model import num_parameters

    child = extract(parent, arch)
    with torch.no_grad():
        masked = parent(tokens, elastic=hard_state(parent.config, arch))
        sliced = child(tokens)
    assert masked.abs().max() > 1.0
    torch.testing.assert_close(sliced, masked, rtol=0, atol=tol)
    assert child.num_parameters() == sum(num_parameters(child.config).values())
    return child, masked


def cli(cli_exe: list[str], *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The console script with ``args``, as a real subprocess."""
    return run([*cli_exe, *args], cwd=cwd, timeout=timeout)


class BatchLoader:
    """A train loader over a fixed list of (tokens, labels) micro-batches, resumable like the real one."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __next__(self):
        self.pos += 1
        return self.batches[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@dataclasses.dataclass
class BatchData:
    """What a trainer reads its data from (``train_loader``, ``valid_batches``, ``unigram_baseline``),
    over in-memory batches: for tests of one step's arithmetic."""

    train_loader: BatchLoader
    unigram_baseline: float | None = None

    def valid_batches(self, n):
        return []
