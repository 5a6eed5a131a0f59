"""Human-readable parameter tables for a model config (computed from shapes, nothing is built)."""

from __future__ import annotations

from megatron_elastic.model.config import LAYER_NAMES, MOE, HybridConfig, active_parameters, num_parameters


def _fmt(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def parameter_table(config: HybridConfig, *, per_layer: bool = False) -> str:
    counts = num_parameters(config)
    total = sum(counts.values())
    rows: list[tuple[str, int, int]] = [("embedding", 1, counts["embedding"])]
    if per_layer:
        for i, kind in enumerate(config.layer_types):
            rows.append((f"layer {i:>3} {LAYER_NAMES[kind]}", 1, counts[f"layer{i}"]))
    else:
        for symbol, name in LAYER_NAMES.items():
            idx = [i for i, t in enumerate(config.layer_types) if t == symbol]
            if idx:
                rows.append((f"{name} layers ({symbol})", len(idx), sum(counts[f"layer{i}"] for i in idx)))
    rows.append(("final norm", 1, counts["final_norm"]))
    rows.append(("output layer" + (" (tied)" if config.tie_embeddings else ""), 1, counts["output_layer"]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'component':<{width}}{'count':>6}{'parameters':>16}{'share':>9}", "-" * (width + 31)]
    for name, count, n in rows:
        lines.append(f"{name:<{width}}{count:>6}{n:>16,}{100 * n / total:>8.2f}%")
    lines.append("-" * (width + 31))
    lines.append(f"{'total':<{width}}{config.num_layers:>6}{total:>16,}   ({_fmt(total)})")
    if MOE in config.layer_types:
        # what one token uses: every routed expert beyond the top-k of each MoE layer left out; also
        # without the input embedding table (a lookup, no matmul), as MoE models' active counts are quoted
        active = active_parameters(config)
        lines.append(f"{'active per token':<{width}}{'':>6}{active:>16,}   ({_fmt(active)})")
        lookup = active - counts["embedding"]
        lines.append(f"{'  without embedding':<{width}}{'':>6}{lookup:>16,}   ({_fmt(lookup)})")
    return "\n".join(lines)
