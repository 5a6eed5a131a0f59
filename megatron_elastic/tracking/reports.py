"""End-of-run reports of an elastic run: per-budget architectures, the extraction report, and two
plots (the Pareto front of parameters vs validation loss, and loss curves per budget).

Written to ``RUN_DIR/reports`` whatever the trackers; the MLflow backend uploads them as artifacts.
Plots use matplotlib's Agg backend (no display); without matplotlib they are skipped with a note.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_DIR = "reports"


def budget_rows(model_cfg, meta: dict, records: list[dict]) -> list[dict]:
    """One row per budget: its architecture's size and the last validation loss of the run."""
    from megatron_elastic.elastic.space import Architecture, child_config
    from megatron_elastic.model.config import num_parameters

    parent_params = sum(num_parameters(model_cfg).values())
    last_val: dict[str, float] = {}
    for rec in records:
        for k, v in rec.items():
            if k.startswith("val_loss/"):
                last_val[k.split("/", 1)[1]] = v
    rows = []
    for key, arch_dict in meta["architectures"].items():
        budget = float(key)
        child = child_config(model_cfg, Architecture.from_dict(arch_dict))
        n = sum(num_parameters(child).values())
        rows.append({
            "budget": budget, "key": key, "parameters": n, "parameter_fraction": n / parent_params,
            "achieved_cost_fraction": meta["achieved_cost_fraction"][key], "cost": meta["cost"],
            "pattern": child.pattern, "hidden_size": child.hidden_size, "ffn_hidden_size": child.ffn_hidden_size,
            "num_attention_heads": child.num_attention_heads, "mamba_num_heads": child.mamba_num_heads,
            "mamba_head_dim": child.mamba_head_dim, "num_layers": child.num_layers,
            "val_loss": last_val.get(f"b{budget:.2f}"),
        })  # fmt: skip
    return rows


def _markdown(rows: list[dict]) -> str:
    head = ("| budget | parameters | % of parent | achieved cost | pattern | hidden | ffn | attn heads "
            "| mamba heads x dim | val loss |")  # fmt: skip
    lines = ["# Extraction report", "", head, "|" + "---|" * 10]
    for r in rows:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        lines.append(f"| {r['key']} | {r['parameters']:,} | {100 * r['parameter_fraction']:.1f} | "
                     f"{r['achieved_cost_fraction']:.3f} ({r['cost']}) | {r['pattern']} | {r['hidden_size']} | "
                     f"{r['ffn_hidden_size']} | {r['num_attention_heads']} | "
                     f"{r['mamba_num_heads']} x {r['mamba_head_dim']} | {val} |")  # fmt: skip
    lines += ["", "Extract any budget with `megatron-elastic extract --checkpoint RUN_DIR/many-in-one --budget B`."]
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], path: Path) -> Path:
    """Parameters (x) vs final validation loss (y), one labelled point per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["parameters"], r["val_loss"], r["key"]) for r in rows if r["val_loss"] is not None)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "o-", color="tab:blue")
    for n, loss, key in pts:
        ax.annotate(f"budget {key}", (n / 1e6, loss), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.margins(x=0.2, y=0.2)  # room for the labels
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Budgets of the many-in-one model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def loss_curves_plot(records: list[dict], budget_keys: list[str], path: Path) -> Path:
    """Training KD loss (left) and validation loss (right) over steps, one line per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for tag in budget_keys:
        for ax, key in ((left, f"kd_loss/{tag}"), (right, f"val_loss/{tag}")):
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), "o-" if ax is right else "-", label=f"budget {tag[1:]}", markersize=3)
    for ax, title in ((left, "training KD loss"), (right, "validation loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_elastic_reports(run_dir: Path, model_cfg, meta: dict, records: list[dict], *,
                          log=print) -> list[tuple[Path, str]]:  # fmt: skip
    """Write every report; returns (file, artifact folder) pairs for the trackers."""
    out = Path(run_dir) / REPORT_DIR
    (out / "architectures").mkdir(parents=True, exist_ok=True)
    rows = budget_rows(model_cfg, meta, records)
    files: list[tuple[Path, str]] = []
    for r in rows:
        path = out / "architectures" / f"budget-{r['key']}.json"
        path.write_text(json.dumps({**r, "architecture": meta["architectures"][r["key"]]}, indent=2) + "\n")
        files.append((path, "architectures"))
    (out / "extraction_report.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "extraction_report.md").write_text(_markdown(rows))
    files += [(out / "extraction_report.json", "reports"), (out / "extraction_report.md", "reports")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("[reports] matplotlib is not installed: no plots (pip install 'megatron-elastic[mlflow]')")
        return files
    files.append((pareto_plot(rows, out / "pareto.png"), "plots"))
    keys = [f"b{float(k):.2f}" for k in meta["architectures"]]
    files.append((loss_curves_plot(records, keys, out / "loss_curves.png"), "plots"))
    return files
