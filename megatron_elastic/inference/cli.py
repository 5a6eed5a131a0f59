"""``megatron-elastic generate``: greedy text generation from one budget of a many-in-one checkpoint
(or from any native / Hugging Face model directory)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from megatron_elastic.errors import UserError


def _tokenizer(ckpt: Path, vocab_size: int, spec: str | None):
    from megatron_elastic.data.tokenizer import load_tokenizer

    if spec is None:
        spec = str(ckpt / "tokenizer.json") if (ckpt / "tokenizer.json").is_file() else "builtin"
    elif spec != "builtin" and not Path(spec).is_file():
        raise UserError(f"--tokenizer {spec!r} does not exist; give a tokenizer.json or 'builtin'")
    tok = load_tokenizer(spec, vocab_size=vocab_size)
    if tok.vocab_size > vocab_size:
        raise UserError(f"tokenizer {spec!r} has {tok.vocab_size} tokens but the model only {vocab_size}; "
                        "pass the tokenizer the model was trained with (--tokenizer)")  # fmt: skip
    return tok


def cmd_generate(args) -> int:
    import torch

    from megatron_elastic.api import load_pretrained, read_model_config
    from megatron_elastic.inference import ElasticModel, greedy_generate
    from megatron_elastic.inference.elastic_model import budget_architecture

    ckpt = Path(args.checkpoint)
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    if not args.prompt:
        raise UserError("--prompt is empty; give some text to continue")
    many_in_one = (ckpt / "elastic.json").is_file()
    if many_in_one:
        from megatron_elastic.elastic.manyinone import read_metadata

        meta = read_metadata(ckpt)
        budget = args.budget if args.budget is not None else max(float(k) for k in meta["architectures"])
        budget_architecture(meta, budget)  # an unknown budget fails before reading weights
        cfg = read_model_config(ckpt)
    else:
        if args.budget is not None:
            raise UserError(f"{str(ckpt)!r} is a single model, not a many-in-one checkpoint (no elastic.json); drop --budget")
        cfg = read_model_config(ckpt)
    tok = _tokenizer(ckpt, cfg.vocab_size, args.tokenizer)
    if many_in_one:
        elastic = ElasticModel.load(ckpt)
        model = elastic.at_budget(budget, contiguous=args.contiguous)
        what = f"budget {budget} ({model.num_parameters():,} of {elastic.parent.num_parameters():,} parameters)"
    else:
        model = load_pretrained(ckpt)
        what = f"{model.num_parameters():,} parameters"
    ids = tok.encode(args.prompt)
    if not ids:
        raise UserError("--prompt encodes to no tokens; give some text to continue")
    prompt = torch.tensor([ids], dtype=torch.long)
    t0 = time.perf_counter()
    out = greedy_generate(model, prompt, args.max_new_tokens)
    dt = time.perf_counter() - t0
    print(args.prompt + tok.decode(out[0, len(ids):].tolist()))
    print(f"[generate] {what}: {len(ids)} prompt + {args.max_new_tokens} new tokens in {dt:.2f}s "
          f"({args.max_new_tokens / max(dt, 1e-9):.1f} tokens/s, greedy, incremental decoding)", file=sys.stderr)  # fmt: skip
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="greedy text generation from one budget of a many-in-one checkpoint")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/many-in-one (or a native / Hugging Face model directory)")
    p.add_argument("--budget", default=None, help="budget to run, e.g. 0.5 (default: the largest)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or 'builtin' (default: the checkpoint's tokenizer.json, else the built-in BPE)")
    p.add_argument("--contiguous", action="store_true",
                   help="run an extracted copy of the budget instead of views of the parent's weights")
    p.set_defaults(func=cmd_generate)
