"""The README's main job on the built-in tiny default (CPU, seconds for now).

Builds the tiny parent, writes it natively, exports it to Hugging Face ``nemotron_h`` and checks
that ``transformers`` computes the same logits, converts it back and checks the weights are
bit-identical, then prints the parameter table. Later stages of the pipeline extend this demo.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from megatron_elastic.convert.hf import load_hf, save_hf
from megatron_elastic.convert.native import load_native, save_native
from megatron_elastic.model import HybridLM, preset
from megatron_elastic.model.summary import parameter_table

PARITY_TOLERANCE = 1e-4


def _step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def run_demo(out: Path, *, seed: int = 0) -> int:
    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(seed)
    config = preset("tiny")
    total = 5
    _step(1, total, f"building the tiny parent: pattern {config.pattern}, hidden {config.hidden_size}")
    model = HybridLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(tokens)

    _step(2, total, f"saving native checkpoint -> {out / 'parent'}")
    save_native(model, out / "parent")

    _step(3, total, f"exporting to Hugging Face nemotron_h -> {out / 'parent-hf'}")
    save_hf(load_native(out / "parent"), out / "parent-hf")
    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM.from_pretrained(out / "parent-hf").eval()
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    diff = (hf_logits - logits).abs().max().item()
    print(f"      transformers NemotronHForCausalLM vs ours: max |logit diff| = {diff:.2e} (tolerance {PARITY_TOLERANCE:.0e})")

    _step(4, total, f"converting back from Hugging Face -> {out / 'parent-roundtrip'}")
    from megatron_elastic.cli import main as cli_main

    rc = cli_main(["convert", "from-hf", str(out / "parent-hf"), str(out / "parent-roundtrip")])
    back = load_native(out / "parent-roundtrip")
    same = rc == 0 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    print(f"      round trip native -> HF -> native bit-identical: {same}")

    _step(5, total, "parameter table")
    print(parameter_table(config, per_layer=True))
    ok = diff <= PARITY_TOLERANCE and same
    print(f"demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s; outputs in {out}")
    return 0 if ok else 1
