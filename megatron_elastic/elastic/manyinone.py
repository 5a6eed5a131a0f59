"""The many-in-one checkpoint: one parent's weights that hold every budget.

Layout (a native model directory plus three small files)::

    DIR/
      megatron_elastic.json, model.safetensors   the elastically trained parent (load_pretrained reads it)
      router.safetensors                         the budget router (a few thousand parameters)
      elastic.json                               the elastic space, the budgets, the cost kind, and for
                                                 every budget its resolved architecture and cost

Extraction needs only ``elastic.json`` and the weights: each budget's architecture was resolved
(router argmax) when the checkpoint was written. The directory is the parent's size plus the
router and a compact JSON file (``megatron-elastic extract`` reports the ratio).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_elastic.errors import CheckpointError, UserError

FORMAT = "megatron-elastic-many-in-one"
FORMAT_VERSION = 1


def budget_key(budget: float) -> str:
    return f"{budget:.4g}"


def select_budgets(archs: dict, budget: str | None, all_budgets: bool, out: Path) -> dict[str, Path]:
    """The budgets an ``extract`` command asked for (``--budget B`` or ``--all``) -> output directory each
    (``out`` itself for one budget, ``out/budget-B`` for all)."""
    if all_budgets:
        wanted = list(archs)
    else:
        try:
            key = budget_key(float(budget))
        except (TypeError, ValueError):
            raise UserError(f"--budget {budget!r} is not a number; give e.g. 0.5 (or use --all)") from None
        if key not in archs:
            raise UserError(f"budget {budget} is not in this checkpoint; it holds {', '.join(archs)} (or use --all)")
        wanted = [key]
    return {k: (out / f"budget-{k}" if all_budgets else out) for k in wanted}


def metadata(space, budgets, architecture_for, *, cost_fraction, cfg) -> dict:
    """``architecture_for(i)`` / ``cost_fraction(i)``: budget i's resolved architecture and its cost
    relative to the parent's."""
    archs, achieved = {}, {}
    for i, b in enumerate(budgets):
        archs[budget_key(b)] = architecture_for(i).to_dict()
        achieved[budget_key(b)] = cost_fraction(i)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "budgets": list(budgets),
        "cost": cfg.cost,
        "space": space.to_dict(),
        "architectures": archs,
        "achieved_cost_fraction": achieved,
        "router": {"hidden": cfg.router_hidden, "num_budgets": len(budgets)},
    }


def save(dst: Path, *, model, router, metadata: dict, ranking: str | None = None, overwrite: bool = True) -> Path:
    """``model``: the parent, a module or its tensors streamed one at a time (``convert.native.NativeTensors``,
    a sharded run's export: written as they arrive)."""
    from safetensors.torch import save as st_save

    from megatron_elastic.convert.native import save_native

    if ranking:  # provenance only: extraction needs the resolved architectures, not the ranking
        metadata = metadata | {"ranking": str(Path(ranking).resolve())}
    extra: dict[str, str | bytes] = {
        "elastic.json": json.dumps(metadata, separators=(",", ":")) + "\n",
        "router.safetensors": st_save({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}),
    }
    return save_native(model, dst, overwrite=overwrite, extra_files=extra)


def read_metadata(path: Path) -> dict:
    from megatron_elastic.utils.io import read_json

    meta = read_json(Path(path) / "elastic.json", "elastic metadata")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r}: elastic.json is not a many-in-one checkpoint (format {meta.get('format')!r}); "
            "give RUN_DIR/many-in-one or a checkpoint of an elastic run"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r}: many-in-one format_version {meta.get('format_version')!r} is not supported")
    archs = meta.get("architectures")
    if not isinstance(archs, dict) or not archs:
        raise CheckpointError(f"{str(path)!r}: elastic.json lists no architectures; the file is corrupt")
    for key in archs:  # keys name output directories (extract --all): only canonical budget numbers
        if not is_budget_key(key):
            raise CheckpointError(f"{str(path)!r}: elastic.json has a budget key {str(key)[:40]!r} that is not a budget "
                                  "fraction like '0.5'; the file is corrupt or was not written by megatron-elastic")  # fmt: skip
    return meta


def is_budget_key(key: object) -> bool:
    """Whether ``key`` is what :func:`budget_key` writes for a budget in (0, 1]."""
    try:
        value = float(key)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return isinstance(key, str) and 0.0 < value <= 1.0 and budget_key(value) == key


def weights_size(path: Path) -> int:
    return (Path(path) / "model.safetensors").stat().st_size


def dir_size(path: Path, *, exclude: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.name not in exclude)



def extract_budgets(checkpoint: str | Path, out: str | Path, *, budget: str | None = None, all_budgets: bool = False,
                    fmt: str = "native", overwrite: bool = False, log=print) -> dict[str, Path]:  # fmt: skip
    """Cut ``budget`` (or every budget, into ``out/budget-B``) out of a many-in-one checkpoint, zero-shot,
    as native or Hugging Face (``fmt="hf"``) model directories; every output and child config is checked
    before the weights are read. Logs a table; returns budget key -> output directory."""
    import time

    from megatron_elastic.api import load_pretrained, save_model
    from megatron_elastic.convert.native import read_native_config
    from megatron_elastic.elastic.slicing import extract
    from megatron_elastic.elastic.space import Architecture, child_config
    from megatron_elastic.model.config import active_parameters, num_parameters
    from megatron_elastic.utils.io import check_writable

    ckpt = Path(checkpoint)
    meta = read_metadata(ckpt)
    parent_cfg = read_native_config(ckpt)
    archs = meta["architectures"]
    targets = select_budgets(archs, budget, all_budgets, Path(out))
    for path in targets.values():
        if path.exists() and not overwrite:
            raise UserError(f"output directory {str(path)!r} already exists; choose a new path or pass --overwrite")
        check_writable(path, "output directory")
    plans = {}
    for key in targets:
        arch = Architecture.from_dict(archs[key])
        child_cfg = child_config(parent_cfg, arch)  # validates against the parent
        if fmt == "hf":
            from megatron_elastic.convert.hf import config_to_hf

            config_to_hf(child_cfg)
        plans[key] = (arch, child_cfg)
    parent = load_pretrained(ckpt, dtype=None)
    total = sum(num_parameters(parent_cfg).values())
    ratio = dir_size(ckpt) / weights_size(ckpt)
    log(f"many-in-one checkpoint {ckpt}: {len(archs)} budgets ({meta['cost']} cost), {dir_size(ckpt):,} bytes on disk "
        f"= {ratio:.4f}x the parent's weights")  # fmt: skip
    log(f"{'budget':>8}{'parameters':>14}{'% params':>10}  pattern / sizes -> output")
    for key, (arch, c) in plans.items():
        t0 = time.perf_counter()
        child = extract(parent, arch).eval()
        extra = {"architecture.json": json.dumps(arch.to_dict(), indent=2) + "\n"}
        save_model(child, targets[key], fmt, overwrite=overwrite, side_files_from=ckpt, extra_files=extra)
        n = child.num_parameters()
        moe = ""
        if c.num_moe_experts:  # MoE: the routed experts x their width, top-k, the shared expert, active parameters
            moe = (f" experts={c.num_moe_experts}x{c.moe_ffn_hidden_size} top{c.moe_router_topk} "
                   f"shared={c.moe_shared_expert_intermediate_size} active={active_parameters(c):,}")  # fmt: skip
        log(f"{key:>8}{n:>14,}{100 * n / total:>9.1f}%  {c.pattern} d={c.hidden_size} ffn={c.ffn_hidden_size} "
            f"attn={c.num_attention_heads} mamba={c.mamba_num_heads}x{c.mamba_head_dim}{moe} -> {targets[key]} "
            f"({time.perf_counter() - t0:.1f}s)")  # fmt: skip
    return targets
