"""``megatron-elastic eval`` (every budget of a checkpoint through the harness) and
``megatron-elastic study`` (the whole comparison, see :mod:`.study`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from megatron_elastic.errors import UserError


def _say(msg: str) -> None:
    print(msg, flush=True)


def _eval_config(tasks: str, sets: list[str]):
    from megatron_elastic.eval.harness import EvalConfig, parse_tasks
    from megatron_elastic.eval.study_config import build_section, set_dotted

    ecfg = build_section(EvalConfig, set_dotted({}, sets, strip="eval"), "eval.")
    ecfg.tasks = parse_tasks(tasks)
    return ecfg


def _budgets(text: str, available: list[str]) -> list[str]:
    from megatron_elastic.elastic.manyinone import budget_key

    if text.strip() == "all":
        return list(available)
    wanted = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        try:
            key = budget_key(float(part))
        except ValueError:
            raise UserError(f"--budgets {text!r}: {part!r} is not a number; give e.g. 1,0.75,0.5 or all") from None
        if key not in available:
            raise UserError(f"budget {part} is not in the checkpoint; it holds {', '.join(available)} (or use --budgets all)")
        wanted.append(key)
    if not wanted:
        raise UserError(f"--budgets {text!r} names no budget; give e.g. 0.75,0.5 or all")
    return wanted


def cmd_eval(args) -> int:
    from megatron_elastic.api import read_model_config
    from megatron_elastic.config import load_config

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"output directory {args.out!r} already exists; choose a new path or pass --overwrite")
    from megatron_elastic.utils.io import check_writable

    check_writable(out, "output directory")
    ecfg = _eval_config(args.tasks, args.set)
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint {args.checkpoint!r} does not exist; give a many-in-one checkpoint or a model directory")
    bad = [o for o in args.overrides if not o.strip().startswith(("data.", "run_dir"))]
    if bad:
        raise UserError(f"override {bad[0]!r} is not allowed: the model comes from --checkpoint; override only data.*")
    model_cfg = read_model_config(ckpt)
    if (ckpt / "elastic.json").is_file():
        from megatron_elastic.elastic.manyinone import read_metadata

        meta = read_metadata(ckpt)
        available = list(meta["architectures"])
    else:
        meta, available = None, ["1"]
    keys = _budgets(args.budgets, available)
    from megatron_elastic.elastic import Architecture, extract

    archs = {} if meta is None else {key: Architecture.from_dict(meta["architectures"][key]) for key in keys}
    import dataclasses

    recipe = load_config(args.config, [f"run_dir={out}", *args.overrides])
    run_cfg = dataclasses.replace(recipe, model=model_cfg)
    run_cfg.validate()

    from megatron_elastic.eval.harness import build_context, evaluate_models

    start = time.perf_counter()
    ctx = build_context(run_cfg, ecfg, log=_say)  # every input checked (shift text, corpus) before models load
    from megatron_elastic.api import load_pretrained

    parent = load_pretrained(ckpt)
    models = {}
    for key in keys:
        models[key] = parent if meta is None else extract(parent, archs[key]).eval()
    _say(f"[eval] {ckpt}: budgets {', '.join(keys)}; tasks {', '.join(ecfg.tasks)}")
    results = evaluate_models(models, ctx, log=_say)
    full = parent.num_parameters()
    from megatron_elastic.eval.report import _atomic_write

    cols = [("loss", ".4f"), ("bpb", ".3f"), ("shift_loss", ".4f"), ("shift_bpb", ".3f"), ("recall", ".3f")]
    shown = [(c, f) for c, f in cols if any(c in r for r in results.values())]
    head = ["budget", "parameters", "% params", f"memory MB @{ecfg.memory_context}", "latency ms"] + [c for c, _ in shown]
    md = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for key, r in results.items():
        cells = [key, f"{r['parameters']:,}", f"{100 * r['parameters'] / full:.1f}", f"{r['memory_bytes'] / 2**20:.2f}",
                 f"{r['latency_ms']:.1f}"] + [format(r[c], f) if c in r else "—" for c, f in shown]  # fmt: skip
        md.append("| " + " | ".join(cells) + " |")
    if "sample" in ecfg.tasks:
        md += ["", "Greedy samples (incremental decoding):", ""]
        md += [f"- {key}: `{json.dumps(r['sample'])[1:-1]}`" for key, r in results.items()]
    from megatron_elastic.utils.io import atomic_directory

    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        payload = {"checkpoint": str(ckpt), "tasks": ecfg.tasks, "eval": ecfg.to_dict(), "results": results}
        _atomic_write(tmp / "eval.json", (json.dumps(payload, indent=2) + "\n").encode())
        _atomic_write(tmp / "eval.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))
    _say(f"[eval] wrote {out}/eval.json and {out}/eval.md in {time.perf_counter() - start:.0f}s")
    return 0


def cmd_study(args) -> int:
    from megatron_elastic.eval.study import Study
    from megatron_elastic.eval.study_config import load_study_config

    cfg = load_study_config(args.config, args.overrides)
    report = Study(cfg).run()
    _say(f"[study] done in {report['wall_s'] / 60:.1f} min")
    return 0


def register(subparsers) -> None:
    """Add ``eval`` and ``study`` to the top-level subcommands."""
    from megatron_elastic.eval.tasks import TASKS

    p = subparsers.add_parser("eval", help="evaluate every budget of a checkpoint: params, memory, latency, loss, "
                                           "bits per byte, recall, shifted domain, greedy sample")  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="many-in-one checkpoint (RUN_DIR/many-in-one) or a model directory")
    p.add_argument("--budgets", default="all", help="comma-separated budgets of the checkpoint, or all (default)")
    p.add_argument("--tasks", default="loss,recall,shift",
                   help=f"comma-separated tasks: {', '.join(TASKS)} (or all); default loss,recall,shift")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory (eval.json, eval.md)")
    p.add_argument("--config", default="tiny", help="recipe whose data section is used (default tiny)")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="evaluation setting, e.g. batches=16, shift_data=/path, mqar.num_pairs=4 (repeatable)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="data overrides, e.g. data.cache_dir=/tmp/c")
    p.set_defaults(func=cmd_eval)

    s = subparsers.add_parser("study", help="run the whole comparison (nested vs baselines, recall, shift) and "
                                            "write docs/results.md with plots")  # fmt: skip
    s.add_argument("--config", default="configs/study-tiny.yaml", help="study recipe (default configs/study-tiny.yaml)")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="study overrides, e.g. recall.steps=50 work_dir=/tmp/study results=/tmp/results.md")  # fmt: skip
    s.set_defaults(func=cmd_study)
