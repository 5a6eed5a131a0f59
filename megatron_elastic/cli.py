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


def _torch_dtype(name: str):
    import torch

    return None if name == "keep" else getattr(torch, name)


def _check_output(dst: str, overwrite: bool) -> None:
    if Path(dst).exists() and not overwrite:
        raise UserError(f"output directory {dst!r} already exists; choose a new path or pass --overwrite")


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
        from megatron_elastic.convert.hf import config_from_hf, is_hf_dir
        from megatron_elastic.convert.native import is_native_dir, read_native_config
        from megatron_elastic.utils.io import read_json

        path = Path(args.target)
        if is_native_dir(path):
            config, what = read_native_config(path), f"native model {args.target}"
        elif is_hf_dir(path):
            config = config_from_hf(read_json(path / "config.json", "Hugging Face config"), src=str(path))
            what = f"Hugging Face nemotron_h model {args.target}"
        else:
            raise UserError(
                f"{args.target!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory; "
                "give a preset name or a native / Hugging Face model directory"
            )
    print(f"{what}: pattern {''.join(config.layer_types)} ({config.num_layers} layers), hidden {config.hidden_size}")
    print(parameter_table(config, per_layer=args.per_layer))
    return 0


# ---------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from megatron_elastic.config import load_config

    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.mlflow_uri={args.tracking_uri}")
        overrides.append("tracking.backends=console,mlflow")
    cfg = load_config(args.config, overrides)

    from megatron_elastic.training import checkpoint
    from megatron_elastic.training.data_setup import build_training_data
    from megatron_elastic.training.trainer import Trainer

    latest = checkpoint.latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    if latest is not None:  # a run to resume: check it before preparing data or building anything
        checkpoint.validate_checkpoint(latest, cfg.model)
    data = build_training_data(cfg)  # every input checked before the model is built
    result = Trainer(cfg, data).fit()
    if result.exit_code == 0 and result.val_loss is not None:
        base = data.unigram_baseline
        print(f"[train] final validation loss {result.val_loss:.4f} nats/token"
              + (f" (unigram baseline {base:.4f})" if base is not None else ""), flush=True)  # fmt: skip
    return result.exit_code


# ---------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from megatron_elastic.demo import run_demo

    return run_demo(Path(args.out), seed=args.seed, overrides=args.overrides)


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
    info.add_argument("target", help="preset name (tiny, nemotron-nano-12b-v2) or model directory")
    info.add_argument("--per-layer", action="store_true", help="one row per layer")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a parent model from a YAML recipe (resumes an existing run_dir)")
    train.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    train.add_argument("--tracking-uri", default="", help="MLflow tracking URI (enables the mlflow backend)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.lr=3e-4")
    train.set_defaults(func=cmd_train)

    from megatron_elastic.data.preprocess import add_data_subcommands

    add_data_subcommands(sub)

    demo = sub.add_parser("demo", help="run the pipeline demo on the built-in tiny model (CPU, minutes)")
    demo.add_argument("--out", default="runs/demo", help="output directory (replaced if it exists)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of configs/tiny.yaml")
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
        print(f"megatron-elastic: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megatron-elastic: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
