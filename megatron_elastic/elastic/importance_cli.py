"""``megatron-elastic importance``: rank every elastic axis of a parent on calibration data and write
the permuted parent (every submodel then is a prefix slice).

::

    megatron-elastic importance --checkpoint CKPT --out DIR [--config RECIPE] [--batches N]
        [--batch-size B] [--seq-len L] [--depth-method iterative-mse|block-influence|random]
        [--seed S] [--device auto|cpu|cuda] [--overwrite] [section.key=value ...]

CKPT is a native model directory or a Hugging Face ``nemotron_h`` directory. Calibration text is
the ``data`` section of RECIPE (default: the ``tiny`` recipe) with the model section replaced by the
checkpoint's config; ``N`` micro-batches of ``B`` x ``L`` tokens are drawn from its training split
(shuffled with ``--seed``). Outputs, written atomically (nothing is written on an error)::

    DIR/parent/         the permuted parent, a native model directory (same function as CKPT)
    DIR/ranking.json    the ranking (orders and raw scores, see megatron_elastic.elastic.importance)
    DIR/importance.md   a readable report
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

from megatron_elastic.errors import UserError

# Equal to megatron_elastic.elastic.importance.DEPTH_METHODS (tested); repeated here so that building
# the parser does not import torch.
DEPTH_METHODS = ("iterative-mse", "block-influence", "random")
DEFAULT_RECIPE = "tiny"
DEFAULT_BATCHES = 8
DEFAULT_BATCH_SIZE = 4


def _say(msg: str) -> None:
    print(msg, flush=True)


def _positive_int(flag: str, value, *, allow_zero: bool = False) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < (0 if allow_zero else 1):
        need = "a non-negative integer" if allow_zero else "a positive integer"
        raise UserError(f"{flag}={value!r} is invalid; give {need}")
    return number


def cmd_importance(args) -> int:
    # ---- every flag checked before anything is loaded
    if not args.checkpoint:
        raise UserError("--checkpoint is required; give a native or Hugging Face model directory")
    if not args.out:
        raise UserError("--out is required; give a directory for the permuted parent and the ranking")
    batches = _positive_int("--batches", args.batches)
    batch_size = _positive_int("--batch-size", args.batch_size)
    seq_len = None if args.seq_len is None else _positive_int("--seq-len", args.seq_len)
    seed = _positive_int("--seed", args.seed, allow_zero=True)
    if args.depth_method not in DEPTH_METHODS:
        raise UserError(f"--depth-method={args.depth_method!r} is unknown; use one of {', '.join(DEPTH_METHODS)}")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device={args.device!r} is invalid; use auto, cpu or cuda")
    model_overrides = [o for o in args.overrides if o.strip().startswith("model.") or o.strip().startswith("model=")]
    if model_overrides:
        raise UserError(
            f"override {model_overrides[0]!r} is not allowed: the model comes from --checkpoint; "
            "override only data.* (and run_dir)"
        )
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"output directory {str(out)!r} already exists; choose a new path or pass --overwrite")
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise UserError(f"checkpoint {str(ckpt)!r} does not exist; give a native or Hugging Face model directory")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA device is available; use --device cpu or auto")
    from megatron_elastic.config import load_config

    overrides = list(args.overrides) + ([f"data.seq_len={seq_len}"] if seq_len is not None else [])
    recipe = load_config(args.config or DEFAULT_RECIPE, overrides)

    from megatron_elastic.api import load_pretrained

    start = time.perf_counter()
    model = load_pretrained(ckpt, dtype=None)  # the stored dtype: a permutation is exact in any dtype
    cfg = dataclasses.replace(
        recipe,
        model=model.config,
        train=dataclasses.replace(recipe.train, micro_batch_size=batch_size, global_batch_size=batch_size, seed=seed),
    )
    cfg.validate()  # e.g. the tokenizer's vocabulary must fit the checkpoint's
    c = model.config
    dtype = next(model.parameters()).dtype
    _say(f"[importance] checkpoint {ckpt}: pattern {''.join(c.layer_types)} ({c.num_layers} layers), "
         f"hidden {c.hidden_size}, {model.num_parameters():,} parameters, {dtype}")  # fmt: skip

    from megatron_elastic.data.loader import PackedLoader
    from megatron_elastic.training.data_setup import build_training_data

    data = build_training_data(cfg)
    loader = PackedLoader(data.train_dataset, micro_batch_size=batch_size, seed=seed)
    calib = [tokens for tokens, _ in itertools.islice(loader, batches)]
    _say(f"[importance] calibration: {len(calib)} batches x {batch_size} x {cfg.data.seq_len} tokens "
         f"from {cfg.data.train_prefix!r} (seed {seed})")  # fmt: skip

    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    model.to(device)

    from megatron_elastic.elastic.importance import compute_ranking
    from megatron_elastic.elastic.permute import permute_

    ranking = compute_ranking(model, calib, depth_method=args.depth_method, seed=seed, log=_say)
    ranking.meta["checkpoint"] = str(ckpt)
    probe = calib[0].to(device)
    with torch.no_grad():
        before = model(probe)
        permute_(model, ranking)
        after = model(probe)
    diff = (after - before).abs().max().item()
    scale = before.abs().max().item()
    _say(f"[importance] permuted parent vs original on calibration batch 1: max |logit diff| = {diff:.2e} "
         f"(max |logit| {scale:.3g})")  # fmt: skip

    from megatron_elastic.convert.native import save_native
    from megatron_elastic.utils.io import atomic_directory, write_json

    model.cpu()
    report = ranking.report(model.config)
    report += (f"\n## Permutation check\n\nPermuted parent vs original on calibration batch 1: max |logit diff| = "
               f"{diff:.3e} (max |logit| {scale:.4g}).\n")  # fmt: skip
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        save_native(model, tmp / "parent", side_files_from=ckpt)
        write_json(tmp / "ranking.json", ranking.to_dict())
        (tmp / "importance.md").write_text(report)
    depth = ", ".join(str(i) for i in ranking.depth)
    _say(f"[importance] depth removal order ({ranking.depth_method}, least important first): {depth}")
    _say(f"[importance] wrote {out}/parent (permuted parent), {out}/ranking.json, {out}/importance.md "
         f"in {time.perf_counter() - start:.0f}s")  # fmt: skip
    return 0


def add_importance_subcommand(subparsers) -> None:
    """Register ``importance`` on the top-level subparsers of ``megatron-elastic``."""
    p = subparsers.add_parser(
        "importance",
        help="rank channels, neurons, heads and layers on calibration data; write the permuted parent",
        description="Activation-based importance of every elastic axis (hidden channels, FFN neurons, attention "
        "and Mamba heads, Mamba head channels, depth), then permute the parent so that index order is importance "
        "order. Writes DIR/parent (native model), DIR/ranking.json and DIR/importance.md.",
    )
    p.add_argument(
        "--checkpoint", default=None, metavar="CKPT", help="native or Hugging Face nemotron_h model directory"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help=f"recipe whose data section is the calibration text (default: {DEFAULT_RECIPE})")  # fmt: skip
    p.add_argument("--batches", default=str(DEFAULT_BATCHES), metavar="N",
                   help=f"calibration micro-batches (default {DEFAULT_BATCHES})")  # fmt: skip
    p.add_argument("--batch-size", default=str(DEFAULT_BATCH_SIZE), metavar="B",
                   help=f"samples per calibration batch (default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    p.add_argument(
        "--seq-len", default=None, metavar="L", help="tokens per sample (default: the recipe's data.seq_len)"
    )
    p.add_argument("--depth-method", default="iterative-mse", metavar="METHOD",
                   help=f"layer ranking: {', '.join(DEPTH_METHODS)} (default iterative-mse)")  # fmt: skip
    p.add_argument("--seed", default="0", metavar="S", help="calibration sample order and the random depth order")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="recipe overrides, e.g. data.cache_dir=/tmp/cache (not model.*)")  # fmt: skip
    p.set_defaults(func=cmd_importance)
