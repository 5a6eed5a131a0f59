"""The README's main job on the built-in tiny default (CPU, a few minutes on 2 cores).

1. pretrain the tiny parent (``configs/tiny.yaml``) on the built-in corpus and report its
   validation loss against the unigram baseline;
2. export the trained parent to Hugging Face ``nemotron_h`` and check that ``transformers``
   computes the same logits;
3. convert it back and check the weights are bit-identical;
4. print the parameter table.
Later stages of the pipeline (elastic training, extraction, evaluation) extend this demo.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from megatron_elastic.config import load_config
from megatron_elastic.convert.hf import save_hf
from megatron_elastic.convert.native import load_native
from megatron_elastic.model.summary import parameter_table

PARITY_TOLERANCE = 1e-4


def _step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def run_demo(out: Path, *, seed: int = 0, overrides: list[str] | None = None) -> int:
    from megatron_elastic.training.data_setup import build_training_data
    from megatron_elastic.training.trainer import Trainer

    start = time.perf_counter()
    cfg = load_config("tiny", [f"run_dir={out / 'train'}", f"train.seed={seed}", *(overrides or [])])
    if out.exists():
        shutil.rmtree(out)
    total = 4

    _step(1, total, f"pretraining the tiny parent ({cfg.model.pattern}, hidden {cfg.model.hidden_size}) "
                    f"on the built-in corpus for {cfg.train.max_steps} steps")  # fmt: skip
    data = build_training_data(cfg)
    result = Trainer(cfg, data).fit()
    if result.exit_code != 0:
        return result.exit_code
    baseline = data.unigram_baseline
    learned = result.val_loss is not None and result.val_loss < baseline
    print(f"      validation loss {result.val_loss:.4f} nats/token vs unigram baseline {baseline:.4f}")
    parent_dir = Path(cfg.run_dir) / "checkpoints" / (Path(cfg.run_dir) / "checkpoints" / "latest").read_text().strip()

    _step(2, total, f"exporting the trained parent to Hugging Face nemotron_h -> {out / 'parent-hf'}")
    model = load_native(parent_dir).eval()
    save_hf(model, out / "parent-hf")
    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM.from_pretrained(out / "parent-hf").eval()
    tokens, _ = next(iter(data.valid_batches(1)))
    tokens = tokens[:2]
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)).abs().max().item()
    print(f"      transformers NemotronHForCausalLM vs ours on validation text: max |logit diff| = {diff:.2e} "
          f"(tolerance {PARITY_TOLERANCE:.0e})")  # fmt: skip

    _step(3, total, f"converting back from Hugging Face -> {out / 'parent-roundtrip'}")
    from megatron_elastic.cli import main as cli_main

    rc = cli_main(["convert", "from-hf", str(out / "parent-hf"), str(out / "parent-roundtrip")])
    back = load_native(out / "parent-roundtrip")
    same = rc == 0 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    print(f"      round trip native -> HF -> native bit-identical: {same}")

    _step(4, total, "parameter table")
    print(parameter_table(cfg.model, per_layer=True))
    ok = diff <= PARITY_TOLERANCE and same and learned
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.0f}s; outputs in {out}")
    return 0 if ok else 1
