"""The README's main job: the whole pipeline on the built-in tiny default, on CPU.

1. pretrain the tiny parent (``configs/tiny.yaml``) on the built-in corpus;
2. rank importance on calibration batches and permute the parent (its logits do not change);
3. elastic nested distillation (``configs/elastic-tiny.yaml``): one run trains budgets of 100, 75
   and 50 % of the parameters, distilled from the frozen parent;
4. extract every budget zero-shot, check each child equals the masked parent, export the 50 %
   child to Hugging Face ``nemotron_h`` and check ``transformers`` agrees;
5. print a table per budget: parameters, validation loss after elastic training, validation loss of
   one-shot pruning to the same architecture (no training), CPU latency.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

from megatron_elastic.api import load_pretrained
from megatron_elastic.config import load_config
from megatron_elastic.distill.losses import cross_entropy

PARITY_TOLERANCE = 2e-4


def _step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def _train(recipe: str, overrides: list[str]) -> None:
    from megatron_elastic.training.run import run_training

    rc = run_training(load_config(recipe, overrides)).exit_code
    if rc != 0:
        raise SystemExit(rc)


def _to_hf(src: Path, dst: Path) -> None:
    from megatron_elastic.convert.hf import config_to_hf, save_hf

    model = load_pretrained(src, dtype=None)
    config_to_hf(model.config)
    save_hf(model, dst, side_files_from=src)
    print(f"converted native {src} -> Hugging Face nemotron_h {dst} ({model.num_parameters():,} parameters)")


@torch.no_grad()
def _val_loss(model, batches, state=None) -> float:
    total, count = 0.0, 0
    for tokens, labels in batches:
        logits = model(tokens, elastic=state)
        total += cross_entropy(logits, labels, reduction="sum").item()
        count += labels.numel()
    return total / count


@torch.no_grad()
def _latencies_ms(models: list, tokens, repeats: int = 7) -> list[float]:
    """Median forward time of each model, measured interleaved so machine noise hits all alike."""
    for m in models:
        m(tokens)
    times = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            m(tokens)
            times[i].append(time.perf_counter() - t0)
    return [1000 * statistics.median(t) for t in times]


def run_demo(out: Path, *, seed: int = 0, overrides: list[str] | None = None,
             elastic_overrides: list[str] | None = None) -> int:  # fmt: skip
    import json

    from megatron_elastic.elastic import Architecture, extract, hard_state
    from megatron_elastic.elastic.manyinone import extract_budgets
    from megatron_elastic.training.data_setup import build_training_data
    from megatron_elastic.training.run import rank_and_permute

    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    cache = out / "cache"
    common = [f"data.cache_dir={cache}", f"train.seed={1234 + seed}"]
    total = 5

    cfg = load_config("tiny", [f"run_dir={out / 'parent'}", *common, *(overrides or [])])
    _step(1, total, f"pretraining the tiny parent ({cfg.model.pattern}, hidden {cfg.model.hidden_size}) on the "
                    f"built-in corpus for {cfg.train.max_steps} steps")  # fmt: skip
    _train("tiny", [f"run_dir={out / 'parent'}", *common, *(overrides or [])])
    latest = (out / "parent" / "checkpoints" / "latest").read_text().strip()
    parent_ckpt = out / "parent" / "checkpoints" / latest

    _step(2, total, "importance ranking and permutation")
    data_overrides = [o for o in (overrides or []) if o.startswith("data.")]
    rank_and_permute(parent_ckpt, out / "importance", overrides=[*common[:1], *data_overrides], batches=8, batch_size=4,
                     seq_len=cfg.data.seq_len)  # fmt: skip

    _step(3, total, "elastic nested distillation: budgets 100 / 75 / 50 % of the parameters")
    elastic_args = [f"elastic.parent={out / 'importance' / 'parent'}", f"run_dir={out / 'elastic'}", *common,
                    *data_overrides, *(elastic_overrides or [])]  # fmt: skip
    _train("elastic-tiny", elastic_args)
    many = out / "elastic" / "many-in-one"

    _step(4, total, f"extracting every budget zero-shot -> {out / 'children'}")
    extract_budgets(many, out / "children", all_budgets=True)
    meta = json.loads((many / "elastic.json").read_text())
    elastic_parent = load_pretrained(many)
    permuted = load_pretrained(out / "importance" / "parent")
    ecfg = load_config("elastic-tiny", elastic_args)
    data = build_training_data(ecfg, log=lambda m: None)
    batches = list(data.valid_batches(ecfg.train.eval_batches))
    tokens = batches[0][0][:4]
    rows, worst, children = [], 0.0, []
    for key, arch_dict in meta["architectures"].items():
        arch = Architecture.from_dict(arch_dict)
        child = load_pretrained(out / "children" / f"budget-{key}")
        with torch.no_grad():
            worst = max(worst, (child(tokens) - elastic_parent(tokens, elastic=hard_state(elastic_parent.config, arch))).abs().max().item())
        one_shot = extract(permuted, arch).eval()
        rows.append([key, child.num_parameters(), _val_loss(child, batches), _val_loss(one_shot, batches),
                     0.0, child.config.pattern])  # fmt: skip
        children.append(child)
    for row, ms in zip(rows, _latencies_ms(children, tokens)):
        row[4] = ms
    print(f"      every child equals the masked parent: max |logit diff| = {worst:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
    half = min(meta["architectures"], key=float)
    _to_hf(out / "children" / f"budget-{half}", out / f"child-{half}-hf")
    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM.from_pretrained(out / f"child-{half}-hf").eval()
    child = load_pretrained(out / "children" / f"budget-{half}")
    with torch.no_grad():
        hf_diff = (hf(tokens, use_cache=False).logits - child(tokens)).abs().max().item()
    print(f"      transformers loads the {float(half):.0%} child with max |logit diff| = {hf_diff:.2e}")

    _step(5, total, "budgets")
    full = rows[0][1]
    base = data.unigram_baseline
    print(f"{'budget':>8}{'parameters':>13}{'% params':>10}{'val loss':>10}{'one-shot':>10}{'latency ms':>12}  pattern")
    print("-" * 78)
    for key, n, loss, one_shot, ms, pattern in rows:
        print(f"{float(key):>8.0%}{n:>13,}{100 * n / full:>9.1f}%{loss:>10.4f}{one_shot:>10.4f}{ms:>12.1f}  {pattern}")
    print(f"(validation loss in nats/token on the built-in corpus's validation split; unigram baseline {base:.4f};\n"
          f" one-shot = the same architecture sliced from the permuted parent before elastic training)")  # fmt: skip
    ok = worst <= PARITY_TOLERANCE and hf_diff <= PARITY_TOLERANCE and rows[0][2] < base
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.0f}s; outputs in {out}")
    return 0 if ok else 1
