"""The ``megatron-elastic`` command line.

Every error a user can cause (a ``UserError``) is printed as one line on stderr with exit code 2,
before any compute and with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_elastic.errors import UserError
from megatron_elastic.version import __version__

DTYPES = ("keep", "float32", "bfloat16", "float16")
# Characters of an error line at most (values quoted in messages are cut before this, by errors.shown).
MAX_MESSAGE = 1000


def _torch_dtype(name: str):
    import torch

    return None if name == "keep" else getattr(torch, name)


def _check_output(dst: str, overwrite: bool, *, kind: str = "directory") -> None:
    """An output path is checked before any work: not there (or --overwrite), and creatable."""
    from megatron_elastic.utils.io import check_writable

    if Path(dst).exists() and not overwrite:
        raise UserError(f"output {kind} {dst!r} already exists; choose a new path or pass --overwrite")
    check_writable(dst, f"output {kind}", kind=kind)


def _positive(flag: str, value: int) -> int:
    if value is None or value < 1:
        raise UserError(f"{flag} {value} is invalid; give a positive integer")
    return value


# ---------------------------------------------------------------------- convert
def cmd_convert_from_hf(args) -> int:
    from megatron_elastic.convert.hf import load_hf
    from megatron_elastic.convert.native import save_native

    _check_output(args.dst, args.overwrite)
    model = load_hf(args.src, dtype=_torch_dtype(args.dtype))
    save_native(model, args.dst, overwrite=args.overwrite, side_files_from=Path(args.src))
    print(f"converted Hugging Face nemotron_h {args.src} -> native {args.dst} "
          f"({model.num_parameters():,} parameters, {model.config.num_layers} layers '{''.join(model.config.layer_types)}')")  # fmt: skip
    return 0


def cmd_convert_to_hf(args) -> int:
    from megatron_elastic.convert.hf import config_to_hf, save_hf
    from megatron_elastic.convert.native import load_native, read_native_config

    _check_output(args.dst, args.overwrite)
    config_to_hf(read_native_config(args.src))  # fail on an inexpressible config before reading weights
    model = load_native(args.src, dtype=_torch_dtype(args.dtype))
    save_hf(model, args.dst, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
            side_files_from=Path(args.src))  # fmt: skip
    print(f"converted native {args.src} -> Hugging Face nemotron_h {args.dst} ({model.num_parameters():,} parameters)")
    return 0


# ---------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from megatron_elastic.model.config import PRESETS, preset
    from megatron_elastic.model.summary import parameter_table

    if args.target in PRESETS:
        config, what = preset(args.target), f"preset {args.target!r}"
    else:
        from megatron_elastic.api import model_format, read_model_config

        fmt = model_format(args.target)
        if fmt is None:
            raise UserError(
                f"{args.target!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory; "
                "give a preset name or a native / Hugging Face model directory"
            )
        config = read_model_config(args.target)
        what = f"native model {args.target}" if fmt == "native" else f"Hugging Face nemotron_h model {args.target}"
    print(f"{what}: pattern {''.join(config.layer_types)} ({config.num_layers} layers), hidden {config.hidden_size}")
    print(parameter_table(config, per_layer=args.per_layer))
    return 0


# ---------------------------------------------------------------------- prune
def _size(text: str, full: int, flag: str) -> int:
    """'0.5' -> half of ``full`` (a fraction has a decimal point); '12' -> 12."""
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a number; give a fraction like 0.5 or a count like 12") from None
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise UserError(f"{flag} {text} is not a fraction in (0, 1]; give e.g. 0.5 (or a count without a decimal point)")
        return max(1, int(round(value * full)))
    return value


def _round_to_groups(k: int, groups: int) -> int:
    return max(groups, (k // groups) * groups)


def cmd_prune(args) -> int:
    import json

    from megatron_elastic.api import load_pretrained, save_model
    from megatron_elastic.elastic import axes_of, child_config, extract, homogeneous
    from megatron_elastic.model.config import num_parameters

    ckpt = Path(args.checkpoint)
    _check_output(args.out, args.overwrite)
    if args.layers is not None and args.drop_layers:
        raise UserError("give either --layers N or --drop-layers, not both")
    from megatron_elastic.api import read_model_config
    from megatron_elastic.convert.hf import config_to_hf

    cfg = read_model_config(ckpt)
    axes = axes_of(cfg)
    sizes = {}
    for name, flag, groups in (("hidden", "--hidden", 1), ("ffn", "--ffn", 1), ("attn_heads", "--attn-heads", cfg.num_query_groups),
                               ("mamba_heads", "--mamba-heads", cfg.mamba_num_groups), ("mamba_head_dim", "--mamba-head-dim", 1)):  # fmt: skip
        text = getattr(args, name)
        if text is not None:
            k = _size(text, axes[name].full, flag)
            sizes[name] = _round_to_groups(k, groups) if "." in text else k
    drop = [int(i) for i in args.drop_layers or []]
    if args.layers is not None:
        if not 0 < args.layers <= cfg.num_layers:
            raise UserError(f"--layers {args.layers} must be between 1 and the parent's {cfg.num_layers} layers")
        from megatron_elastic.elastic.importance import find_ranking, read_depth_order

        ranking = find_ranking(ckpt, args.ranking, key="--ranking")
        if ranking is None:
            raise UserError("--layers needs a depth ranking (ranking.json from `megatron-elastic importance`, beside or "
                            "inside the checkpoint, or --ranking FILE); or name the layers with --drop-layers")  # fmt: skip
        drop = read_depth_order(ranking)[: cfg.num_layers - args.layers]
    arch = homogeneous(cfg, **sizes, drop_layers=tuple(drop))  # validates: one-line errors before any compute
    child_cfg = child_config(cfg, arch)
    if args.format == "hf":
        config_to_hf(child_cfg)  # a child nemotron_h cannot express fails here, before reading weights
    model = load_pretrained(ckpt, dtype=None)
    child = extract(model, arch).eval()
    extra = {"architecture.json": json.dumps(arch.to_dict(), indent=2) + "\n"}
    save_model(child, args.out, args.format, overwrite=args.overwrite, side_files_from=ckpt, extra_files=extra)
    parent_n, child_n = sum(num_parameters(cfg).values()), sum(num_parameters(child_cfg).values())
    print(f"pruned {args.checkpoint} ({parent_n:,} parameters, pattern {''.join(cfg.layer_types)}) -> {args.out} "
          f"({child_n:,} parameters = {100 * child_n / parent_n:.1f}%, pattern {child_cfg.pattern}, "
          f"hidden {child_cfg.hidden_size}, format {args.format})")  # fmt: skip
    return 0


# ---------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from megatron_elastic.config import load_config

    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.mlflow_uri={args.tracking_uri}")
        overrides.append("tracking.backends=console,mlflow")
    cfg = load_config(args.config, overrides)

    from megatron_elastic.training.run import run_training

    return run_training(cfg).exit_code


# ---------------------------------------------------------------------- extract
def cmd_extract(args) -> int:
    if getattr(args, "quantize", None):  # quantized Hugging Face exports per budget (nvidia-modelopt)
        from megatron_elastic.deploy.quantize import cmd_extract_quantized

        return cmd_extract_quantized(args)
    from megatron_elastic.elastic.manyinone import extract_budgets

    extract_budgets(args.checkpoint, args.out, budget=args.budget, all_budgets=args.all, fmt=args.format,
                    overwrite=args.overwrite)  # fmt: skip
    return 0


# ---------------------------------------------------------------------- profile
def cmd_profile(args) -> int:
    import json
    import os
    import tempfile

    from megatron_elastic.model.config import PRESETS, preset

    out = Path(args.out)
    _check_output(args.out, args.overwrite, kind="file")
    for flag, value in (("--seq-len", args.seq_len), ("--batch", args.batch), ("--repeats", args.repeats)):
        _positive(flag, value)
    if args.model in PRESETS:
        config = preset(args.model)
    else:
        from megatron_elastic.api import read_model_config

        config = read_model_config(args.model, what="model")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is available; use --device cpu")
    from megatron_elastic.elastic.costs import profile_latency

    print(f"[profile] timing one layer of each type at each width ({''.join(sorted(set(config.layer_types)))}), "
          f"batch {args.batch} x seq {args.seq_len} on {args.device}", flush=True)  # fmt: skip
    table = profile_latency(config, None if args.device == "auto" else args.device, args.seq_len, args.batch,
                            repeats=args.repeats)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=2, default=str)
    os.replace(tmp, out)
    print(f"[profile] latency table -> {out} (use it with elastic.cost=latency elastic.latency_table={out})")
    return 0


# ---------------------------------------------------------------------- importance
# Equal to megatron_elastic.elastic.importance.DEPTH_METHODS (tested); repeated here so that building
# the parser does not import torch.
DEPTH_METHODS = ("iterative-mse", "block-influence", "random")
IMPORTANCE_BATCHES = 8
IMPORTANCE_BATCH_SIZE = 4


def _count(flag: str, value, *, allow_zero: bool = False) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < (0 if allow_zero else 1):
        need = "a non-negative integer" if allow_zero else "a positive integer"
        raise UserError(f"{flag}={value!r} is invalid; give {need}")
    return number


def cmd_importance(args) -> int:
    # every flag checked before anything is loaded
    if not args.checkpoint:
        raise UserError("--checkpoint is required; give a native or Hugging Face model directory")
    if not args.out:
        raise UserError("--out is required; give a directory for the permuted parent and the ranking")
    batches = _count("--batches", args.batches)
    batch_size = _count("--batch-size", args.batch_size)
    seq_len = None if args.seq_len is None else _count("--seq-len", args.seq_len)
    seed = _count("--seed", args.seed, allow_zero=True)
    if args.depth_method not in DEPTH_METHODS:
        raise UserError(f"--depth-method={args.depth_method!r} is unknown; use one of {', '.join(DEPTH_METHODS)}")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device={args.device!r} is invalid; use auto, cpu or cuda")
    _check_output(args.out, args.overwrite)
    from megatron_elastic.training.run import rank_and_permute

    rank_and_permute(args.checkpoint, args.out, recipe=args.config, overrides=args.overrides, batches=batches,
                     batch_size=batch_size, seq_len=seq_len, depth_method=args.depth_method, seed=seed,
                     device=args.device, overwrite=args.overwrite)  # fmt: skip
    return 0


def add_importance_parser(sub) -> None:
    p = sub.add_parser(
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
                   help="recipe whose data section is the calibration text (default: tiny)")  # fmt: skip
    p.add_argument("--batches", default=str(IMPORTANCE_BATCHES), metavar="N",
                   help=f"calibration micro-batches (default {IMPORTANCE_BATCHES})")  # fmt: skip
    p.add_argument("--batch-size", default=str(IMPORTANCE_BATCH_SIZE), metavar="B",
                   help=f"samples per calibration batch (default {IMPORTANCE_BATCH_SIZE})")  # fmt: skip
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


# ---------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from megatron_elastic.demo import run_demo

    return run_demo(Path(args.out), seed=args.seed, overrides=args.overrides, elastic_overrides=args.elastic_set)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-elastic",
        description="Elastic nested hybrid Mamba-2/attention/MLP language models: train one parent, extract many budgets.",
    )
    parser.add_argument("--version", action="version", version=f"megatron-elastic {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    conv = sub.add_parser("convert", help="convert checkpoints between native and Hugging Face nemotron_h formats")
    conv_sub = conv.add_subparsers(dest="direction", metavar="DIRECTION")
    for name, func, src_help, dst_help in (
        ("from-hf", cmd_convert_from_hf, "Hugging Face nemotron_h directory", "native output directory"),
        ("to-hf", cmd_convert_to_hf, "native model directory", "Hugging Face output directory"),
    ):
        p = conv_sub.add_parser(name, help=f"{src_help} -> {dst_help}")
        p.add_argument("src", help=src_help)
        p.add_argument("dst", help=f"{dst_help} (must not exist unless --overwrite)")
        p.add_argument("--dtype", choices=DTYPES, default="keep", help="cast floating weights (default: keep)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        if name == "to-hf":
            p.add_argument("--max-shard-size", default="5GB", help="split weights into shards of at most this size")
        p.set_defaults(func=func)
    conv.set_defaults(func=lambda a: conv.print_help() or 2)

    info = sub.add_parser("info", help="print the parameter table of a preset or a model directory")
    info.add_argument("target", help="preset name (tiny, tiny-moe, nemotron-nano-12b-v2, nemotron-3-nano-30b-a3b) or model directory")
    info.add_argument("--per-layer", action="store_true", help="one row per layer")
    info.set_defaults(func=cmd_info)

    prune = sub.add_parser("prune", help="slice a (permuted) parent into a smaller model, one shot (Minitron-style)")
    prune.add_argument("--checkpoint", required=True, help="native or Hugging Face model directory (importance-permuted)")
    prune.add_argument("--out", required=True, help="output directory")
    for flag, what in (("--hidden", "hidden channels"), ("--ffn", "FFN neurons per MLP layer"),
                       ("--attn-heads", "query heads per attention layer (trimmed inside each KV group)"),
                       ("--mamba-heads", "heads per Mamba layer (trimmed inside each group)"),
                       ("--mamba-head-dim", "channels per Mamba head")):  # fmt: skip
        prune.add_argument(flag, default=None, help=f"{what}: a fraction like 0.5 or a count like 12")
    prune.add_argument("--layers", type=int, default=None, help="keep N layers, dropping the least important (needs a ranking)")
    prune.add_argument("--drop-layers", type=int, nargs="+", default=None, metavar="I", help="drop these layer indices")
    prune.add_argument("--ranking", default=None, help="ranking.json with the depth order (default: beside the checkpoint)")
    prune.add_argument("--format", choices=("native", "hf"), default="native", help="output format")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    prune.set_defaults(func=cmd_prune)

    ext = sub.add_parser("extract", help="cut budgets out of a many-in-one checkpoint, zero-shot")
    ext.add_argument("--checkpoint", required=True, help="RUN_DIR/many-in-one of an elastic run")
    which = ext.add_mutually_exclusive_group(required=True)
    which.add_argument("--budget", help="one budget, e.g. 0.5")
    which.add_argument("--all", action="store_true", help="every budget, into OUT/budget-B")
    ext.add_argument("--out", required=True, help="output directory")
    ext.add_argument("--format", choices=("native", "hf"), default="native", help="output format")
    ext.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    ext.add_argument("--quantize", choices=("fp8", "int8", "int4_awq", "nvfp4"), default=None,
                     help="quantize each child with nvidia-modelopt and write a quantized Hugging Face checkpoint "
                          "(--format is then hf; nvfp4 needs CUDA); see docs/deployment.md")
    ext.add_argument("--calib-data", default=None, metavar="PREFIX",
                     help="calibration data: a tokenized .bin/.idx prefix (default: the built-in corpus)")
    ext.add_argument("--calib-samples", type=int, default=32, metavar="N", help="calibration windows of 256 tokens")
    ext.add_argument("--heldout-samples", type=int, default=16, metavar="N",
                     help="held-out windows of 256 tokens for the loss change in the quantization report")
    ext.set_defaults(func=cmd_extract)

    prof = sub.add_parser("profile", help="measure a per-layer latency table on this device (for elastic.cost=latency)")
    prof.add_argument("model", help="preset name or model directory")
    prof.add_argument("--out", required=True, help="JSON file to write")
    prof.add_argument("--seq-len", type=int, default=512)
    prof.add_argument("--batch", type=int, default=1)
    prof.add_argument("--repeats", type=int, default=5)
    prof.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    prof.add_argument("--overwrite", action="store_true")
    prof.set_defaults(func=cmd_profile)

    train = sub.add_parser("train", help="train a parent model from a YAML recipe (resumes an existing run_dir)")
    train.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    train.add_argument("--tracking-uri", default="", help="MLflow tracking URI (enables the mlflow backend)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.lr=3e-4")
    train.set_defaults(func=cmd_train)

    from megatron_elastic.data.preprocess import add_data_subcommands

    add_data_subcommands(sub)
    add_importance_parser(sub)
    from megatron_elastic.eval import cli as eval_cli
    from megatron_elastic.inference import cli as inference_cli
    from megatron_elastic.parallel import plan
    from megatron_elastic.slurm import cli as slurm_cli
    from megatron_elastic.tracking import sync as tracking_sync

    for module in (tracking_sync, plan, inference_cli, slurm_cli, eval_cli):
        module.register(sub)

    demo = sub.add_parser("demo", help="run the pipeline demo on the built-in tiny model (CPU, minutes)")
    demo.add_argument("--out", default="runs/demo", help="output directory (replaced if it exists)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--elastic-set", action="append", default=[], metavar="section.key=value",
                      help="an override of configs/elastic-tiny.yaml (repeatable)")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="overrides of configs/tiny.yaml (data.* ones apply to every stage)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        message = " ".join(str(exc).split())
        if len(message) > MAX_MESSAGE:  # a value quoted from a file can be huge: the line stays readable
            message = message[: MAX_MESSAGE - 3] + "..."
        print(f"megatron-elastic: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megatron-elastic: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
