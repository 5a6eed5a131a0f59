"""The study's report: Markdown tables (``docs/results.md``) and plots (PNG, matplotlib Agg).

Plots: ``pareto.png`` (parameters vs validation loss per method), ``recall.png`` (MQAR accuracy per
budget and method), ``tokens.png`` (training tokens each method spends after the shared parent),
``shift.png`` (bits per byte in domain vs on the shifted domain).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

METHOD_ORDER = ("parent", "nested", "nested-protect", "separate", "one-shot", "depth-only", "scratch", "parent (text only)")
DESCRIPTIONS = {
    "parent": "the recall-fine-tuned, importance-permuted parent: the teacher, and budget 1.0 of every baseline",
    "nested": "elastic nested distillation, children extracted zero-shot (this project's method)",
    "nested-protect": "the same with `elastic.protect_attention=true` (attention layers and heads never cut)",
    "separate": "Minitron-style: each child pruned from the parent, then distilled alone with its share of the nested run's tokens",
    "one-shot": "importance pruning to the nested child's architecture, no training",
    "depth-only": "whole layers dropped by block influence (least first) until within the budget, no training",
    "scratch": "the nested child's architecture trained from random initialisation on the separate runs' tokens",
    "parent (text only)": "the parent before recall fine-tuning (reference)",
}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; reports are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _order(rows: list[dict]) -> list[dict]:
    def key(r):
        m = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else len(METHOD_ORDER)
        return (-(r["budget"] or 0), m)

    return sorted(rows, key=key)


def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


# ---------------------------------------------------------------------- plots
def plot_all(report: dict, images: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    markers = dict(zip(METHOD_ORDER, "*osD^vxP"))
    out: dict[str, Path] = {}
    images.mkdir(parents=True, exist_ok=True)

    def save(fig, name: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=".png", dir=images)
        os.close(fd)
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.chmod(tmp, 0o644)
        os.replace(tmp, images / name)
        out[name] = images / name

    if any("loss" in r for r in rows):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m in methods:
            pts = sorted((r["parameters"], r["loss"]) for r in rows if r["method"] == m and "loss" in r)
            if pts:
                ax.plot([p / 1e3 for p, _ in pts], [l for _, l in pts], marker=markers[m], label=m,
                        linestyle="-" if len(pts) > 1 else "none")  # fmt: skip
        ax.set_xlabel("parameters (thousands)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Parameters vs held-out loss (lower left is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "pareto.png")

    if any("recall" in r for r in rows):
        budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}, reverse=True)
        ms = [m for m in methods if m != "parent (text only)"]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        width = 0.8 / max(1, len(ms))
        for j, m in enumerate(ms):
            xs, ys = [], []
            for i, b in enumerate(budgets):
                r = next((r for r in rows if r["method"] == m and r["budget"] == b and "recall" in r), None)
                if r is not None:
                    xs.append(i + (j - (len(ms) - 1) / 2) * width)
                    ys.append(r["recall"])
            ax.bar(xs, ys, width=width, label=m)
        ax.set_xticks(range(len(budgets)), [f"{b:g}" for b in budgets])
        ax.set_xlabel("budget (fraction of the parent's parameters)")
        ax.set_ylabel("MQAR accuracy")
        chance = 1 / report["config"]["eval"]["mqar"]["num_values"]
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
        ax.set_ylim(0, 1)
        ax.set_title("Associative recall per budget")
        ax.legend(fontsize=7, ncol=2)
        save(fig, "recall.png")

    tokens = report["tokens"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = [n for n in ("nested", "nested-protect", "separate", "scratch", "one-shot", "depth-only") if n in tokens]
    ax.bar(names, [tokens[n] / 1e6 for n in names], color="tab:blue", label="method's own training")
    shared = (tokens.get("parent", 0) + tokens.get("recall fine-tuning", 0)) / 1e6
    ax.axhline(shared, color="tab:orange", linestyle="--", label=f"shared: parent + recall fine-tuning ({shared:.2f} M)")
    ax.set_ylabel("training tokens (millions)")
    ax.set_title("Tokens spent per method (all budgets together)")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    save(fig, "tokens.png")

    if any("shift_bpb" in r and "bpb" in r for r in rows):
        fig, ax = plt.subplots(figsize=(6.0, 4.4))
        for m in methods:
            pts = [(r["bpb"], r["shift_bpb"]) for r in rows if r["method"] == m and "shift_bpb" in r and "bpb" in r]
            if pts:
                ax.scatter([p for p, _ in pts], [q for _, q in pts], marker=markers[m], label=m)
        ax.set_xlabel("bits per byte, built-in corpus (Python source)")
        ax.set_ylabel("bits per byte, shifted domain (license texts)")
        ax.set_title("In-domain vs shifted-domain quality")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "shift.png")
    return out


# ---------------------------------------------------------------------- tables
def headline(report: dict) -> list[str]:
    rows = report["rows"]

    def get(m, b):
        return next((r for r in rows if r["method"] == m and r["budget"] == b), None)

    lines = []
    budgets = sorted({r["budget"] for r in rows if r["method"] == "nested" and r["budget"] is not None}, reverse=True)
    t = report["tokens"]
    for b in budgets:
        n, s = get("nested", b), get("separate", b)
        if b < 1.0 and n and s and "loss" in n:
            diff = s["loss"] - n["loss"]
            better = "better" if diff > 0 else "worse"
            lines.append(f"- budget {b:g}: nested child {n['loss']:.4f} vs separately distilled {s['loss']:.4f} "
                         f"nats/token — nested is {abs(diff):.4f} {better} (bits/byte {n['bpb']:.3f} vs {s['bpb']:.3f})")  # fmt: skip
    if "nested" in t and "separate" in t:
        lines.append(f"- training tokens after the shared parent: nested {t['nested']:,} for all budgets at once, "
                     f"separate {t['separate']:,} summed over its children")  # fmt: skip
    teacher, text_only = get("parent", 1.0), get("parent (text only)", None)
    if teacher and "recall" in teacher:
        lines.append(f"- recall of the parent: {teacher['recall']:.3f} after recall fine-tuning"
                     + (f" ({text_only['recall']:.3f} before)" if text_only and "recall" in text_only else ""))
    for b in budgets:
        n, p = get("nested", b), get("nested-protect", b)
        if n and "recall" in n:
            text = f"- recall at budget {b:g}: nested {n['recall']:.3f}"
            if p and "recall" in p:
                text += f", with protect_attention {p['recall']:.3f}"
            for m in ("separate", "one-shot", "depth-only", "scratch"):
                r = get(m, b)
                if r and "recall" in r and b < 1.0:
                    text += f", {m} {r['recall']:.3f}"
            lines.append(text)
    return lines


def markdown(report: dict, images: dict[str, Path], results_md: Path) -> str:
    cfg = report["config"]
    e = cfg["eval"]
    rows = _order(report["rows"])
    mem_ctx = e["memory_context"]
    lines = ["# Results: elastic nested children vs the alternatives", ""]
    lines += [
        ("Written by `megatron-elastic study --config configs/study-tiny.yaml` from one seeded run "
         f"(seed {cfg['seed']}) on this machine's CPU; wall time {report['wall_s'] / 60:.1f} min. "
         "Every number below comes from that run; rerun the command to reproduce it."), "",
        "## Headline", "",
        *headline(report), "",
        "## Methods", "",
        *[f"- **{m}**: {DESCRIPTIONS[m]}" for m in METHOD_ORDER if any(r["method"] == m for r in rows)], "",
        "## Every model", "",
        (f"Parameters; inference memory at {mem_ctx} tokens of context, batch {e['memory_batch']}, "
         f"{e['memory_bytes']} bytes per element (weights + KV cache + Mamba state); CPU latency of one forward "
         f"pass over {e['latency_len']} tokens (fastest of {e['latency_repeats']} rounds, all models timed "
         "interleaved); validation loss (nats/token) and bits per byte on the built-in corpus; the same on the "
         "shifted domain; MQAR accuracy."), "",
        "| budget | method | parameters | % | memory MB | latency ms | loss | bpb | shift loss | shift bpb | recall | pattern |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in rows:
        b = "—" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(
            f"| {b} | {r['method']} | {r['parameters']:,} | {100 * r['param_fraction']:.1f} | "
            f"{r['memory_bytes'] / 2**20:.2f} | {r['latency_ms']:.1f} | {_f(r.get('loss'), '.4f')} | "
            f"{_f(r.get('bpb'), '.3f')} | {_f(r.get('shift_loss'), '.4f')} | {_f(r.get('shift_bpb'), '.3f')} | "
            f"{_f(r.get('recall'), '.3f')} | `{r['pattern']}` |"
        )
    t = report["tokens"]
    lines += ["", "## Tokens", "",
              ("Input tokens read by each run (text and MQAR micro-batches). The parent's pretraining and its "
               "recall fine-tuning are shared by every method."), "",
              "| run | tokens |", "|---|---:|"]  # fmt: skip
    for k, v in t.items():
        lines.append(f"| {k} | {v:,} |")
    lines += ["", (f"The nested run took {report['nested_steps']} optimizer steps for all budgets; each separate "
                   f"distillation and each from-scratch run took {report['per_child_steps']} steps of the same "
                   "batch (the nested run's steps split evenly over the children), so their totals match the "
                   "nested run's."), ""]  # fmt: skip
    cost = report.get("achieved_cost") or {}
    if cost:
        chosen = "; ".join(f"{m}: " + ", ".join(f"{k} -> {v:.3f}" for k, v in c.items()) for m, c in cost.items())
        lines += [f"Parameter fraction each router chose (the budget's resolved architecture / the parent): {chosen}", ""]
    if images:
        lines += ["## Plots", ""]
        for name, title in (("pareto.png", "Parameters vs loss"), ("recall.png", "Recall per budget"),
                            ("tokens.png", "Tokens per method"), ("shift.png", "In-domain vs shifted domain")):  # fmt: skip
            if name in images:
                lines += [f"![{title}]({_rel(images[name], results_md.parent)})", ""]
    samples = [r for r in rows if r.get("sample") is not None and r["method"] in ("nested", "nested-protect")]
    if samples:
        lines += ["## Greedy samples", "",
                  (f"Prompt `{e['sample_prompt']!r}`, {e['sample_tokens']} new tokens, incremental decoding "
                   "(Mamba state and KV cache)."), ""]  # fmt: skip
        for r in samples:
            lines += [f"- {r['method']} {r['budget']:g}: `{json.dumps(r['sample'])[1:-1]}`"]
        lines.append("")
    m = e["mqar"]
    stage_times = ", ".join(f"{k} {v:.0f}s" for k, v in report["times_s"].items())
    lines += [
        "## Reproduce, or evaluate your own checkpoint", "",
        "```bash",
        "megatron-elastic study --config configs/study-tiny.yaml            # this page and docs/img/*.png",
        "megatron-elastic eval --checkpoint RUN_DIR/many-in-one --budgets all --tasks loss,recall,shift,sample --out DIR",
        "```", "",
        ("`eval` extracts each budget of a many-in-one checkpoint (or takes a plain model directory) and writes "
         "`DIR/eval.json` and `DIR/eval.md` with the columns above; `--set key=value` changes a setting "
         "(`batches=16`, `shift_data=/path/to/text`, `mqar.num_pairs=4`, `memory_context=32768`, ...). Unknown "
         "tasks, budgets the checkpoint does not hold and missing data stop it with one line and exit code 2 "
         "before anything is computed."), "",
        "## Setup", "",
        (f"- Recall task (MQAR): {m['num_pairs']} key-value pairs, then {m['num_queries']} of the keys asked "
         f"again; keys from {m['num_keys']} ids, values from {m['num_values']} ids (chance "
         f"{1 / m['num_values']:.3f}); evaluation set: {e['mqar_batches']} x {e['mqar_batch_size']} sequences "
         f"(seed {e['mqar_seed']}). The parent is fine-tuned for {cfg['recall']['steps']} steps in which one "
         f"micro-batch in {cfg['recall']['mix_every']} is MQAR; every later run (nested, separate, scratch) "
         f"reads one MQAR micro-batch in {cfg['elastic']['mix_every']}."),
        (f"- Shifted domain: the license texts under `{e['shift_data']}` (installed by Debian's essential "
         "`base-files` package): English legal prose with no code, unlike the Python source the parent and "
         "its tokenizer were trained on. Bits per byte make the two domains comparable despite the tokenizer "
         "compressing prose worse."),
        (f"- Validation: the first {e['batches']} micro-batches of {e['batch_size']} windows of the built-in "
         "corpus's validation split (files held out by path hash)."),
        f"- Stage times: {stage_times}.",
        (f"- Recipes: parent `{cfg['parent']['recipe']}` {cfg['parent']['overrides']}, elastic "
         f"`{cfg['elastic']['recipe']}` {cfg['elastic']['overrides']}, data {cfg['data']}."),
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def write_report(report: dict, *, results_md: Path, images: Path, work: Path, log=print) -> None:
    _atomic_write(work / "results.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    pics = plot_all(report, images)
    _atomic_write(results_md, markdown(report, pics, results_md).encode())
    log(f"[study] wrote {results_md}, {len(pics)} plots in {images}, {work / 'results.json'}")
    for line in headline(report):
        log(line)
