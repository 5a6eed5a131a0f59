"""Post-training quantization of extracted children with NVIDIA Model-Optimizer, exported as
quantized Hugging Face checkpoints.

For every budget: slice the child out of the many-in-one parent, write it as a Hugging Face
``nemotron_h`` directory, load it in ``transformers``, calibrate ``modelopt.torch.quantization``
on a few windows of text (the built-in corpus, or the user's tokenized data), export it with
``modelopt.torch.export.export_hf_checkpoint`` (weights stored as FP8 / INT8 / packed INT4 with
their scales, ``hf_quant_config.json`` and a ``quantization_config`` in ``config.json``), then
read the export back (:mod:`megatron_elastic.deploy.load`) and measure its held-out loss against
the unquantized child's.

==========  ======================================  ==========================================
format      Model-Optimizer config                  stored
==========  ======================================  ==========================================
fp8         ``FP8_DEFAULT_CFG``                     E4M3 weights, per-tensor weight and
                                                    static activation scales
int8        ``INT8_DEFAULT_CFG``                    int8 weights with per-channel scales,
                                                    static per-tensor activation scales
int4_awq    ``INT4_AWQ_CFG`` (AWQ-lite)             int4 weights packed two per byte, one scale
                                                    per block of 128 inputs (64 / 32 / 16 when
                                                    the widths need it); activations unquantized
nvfp4       ``NVFP4_DEFAULT_CFG``                   needs CUDA (dynamic block quantization)
==========  ======================================  ==========================================

Embeddings, the output layer, the Mamba conv and every norm / SSM parameter stay in the child's
dtype (Model-Optimizer's defaults exclude them).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from megatron_elastic.distill.losses import cross_entropy
from megatron_elastic.errors import ConfigError, UserError

FORMATS = ("fp8", "int8", "int4_awq", "nvfp4")
CPU_FORMATS = ("fp8", "int8", "int4_awq")
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_HELDOUT_SAMPLES = 16
SEQ_LEN = 256
"""Tokens per calibration / held-out window."""
INT4_BLOCK_SIZES = (128, 64, 32, 16)
REPORT_FILE = "quantization.json"


# ---------------------------------------------------------------------- checks (before any compute)
def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--quantize {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if fmt == "nvfp4" and not torch.cuda.is_available():
        raise ConfigError(
            "--quantize nvfp4 needs a CUDA GPU (Model-Optimizer's NVFP4 block quantization runs only in CUDA "
            "kernels; Blackwell to deploy it); run on a GPU machine or use fp8, int8 or int4_awq on CPU"
        )


def quantized_in_features(config) -> dict[str, int]:
    """Input widths of the linear layers Model-Optimizer quantizes in a child with ``config``."""
    kinds = set(config.layer_types)
    widths = {"hidden (in_proj, q/k/v_proj, up_proj)": config.hidden_size}
    if "M" in kinds:
        widths["Mamba d_inner (out_proj)"] = config.mamba_d_inner
    if "*" in kinds:
        widths["attention heads x head_dim (o_proj)"] = config.num_attention_heads * config.head_dim
    if "-" in kinds:
        widths["ffn (down_proj)"] = config.ffn_hidden_size
    return widths


def int4_block_size(config, where: str) -> int:
    """The largest block size in INT4_BLOCK_SIZES dividing every quantized input width (AWQ packs whole blocks)."""
    widths = quantized_in_features(config)
    for bs in INT4_BLOCK_SIZES:
        if all(w % bs == 0 for w in widths.values()):
            return bs
    bad = ", ".join(f"{k}={v}" for k, v in widths.items() if v % INT4_BLOCK_SIZES[-1])
    raise ConfigError(
        f"{where}: int4_awq needs every quantized input width to be a multiple of {INT4_BLOCK_SIZES[-1]} "
        f"({bad}); use fp8 or int8 for this checkpoint"
    )


def check_child(fmt: str, config, where: str) -> dict:
    """Raise ConfigError unless a child with ``config`` can be quantized to ``fmt`` and exported;
    returns the export options (e.g. the INT4 block size)."""
    from megatron_elastic.convert.hf import config_to_hf

    if config.is_heterogeneous:
        raise ConfigError(
            f"{where} is heterogeneous (per-layer sizes): Hugging Face nemotron_h, and so the quantized export, "
            "holds one size per layer type; quantize homogeneous budgets, or extract this one unquantized "
            "with --format native"
        )
    config_to_hf(config)  # anything else nemotron_h cannot express fails here
    if fmt == "int4_awq":
        return {"block_size": int4_block_size(config, where)}
    return {}


# ---------------------------------------------------------------------- data
def _check_calib_data(calib_data: str | None) -> None:
    if calib_data in (None, "", "builtin"):
        return
    from megatron_elastic.data.indexed import exists

    if not exists(calib_data):
        raise UserError(
            f"--calib-data {calib_data!r}: no {calib_data}.bin / .idx; tokenize your text with the model's "
            "tokenizer first (`megatron-elastic data preprocess --input FILE --tokenizer T --output-prefix P`)"
        )


def _builtin_windows(ckpt: Path, vocab_size: int, split: str, count: int, seq_len: int) -> torch.Tensor:
    """``count`` windows of ``seq_len + 1`` tokens of the built-in corpus, tokenized with the
    checkpoint's tokenizer.json when it has one, else the built-in BPE of the model's vocabulary."""
    from megatron_elastic.data.corpus import builtin_documents
    from megatron_elastic.data.tokenizer import load_tokenizer

    spec = ckpt / "tokenizer.json" if (ckpt / "tokenizer.json").is_file() else "builtin"
    tok = load_tokenizer(spec, vocab_size=vocab_size)
    if tok.vocab_size > vocab_size:
        raise UserError(
            f"tokenizer {str(spec)!r} has {tok.vocab_size} tokens but the model only {vocab_size}; "
            "pass --calib-data with data tokenized for this model"
        )
    need = count * (seq_len + 1)
    ids: list[int] = []
    for doc in builtin_documents(split):
        ids.extend(tok.encode(doc))
        ids.append(tok.eod_id)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise UserError(f"the built-in corpus ({split}) gives {len(ids)} tokens, fewer than {need}; lower --calib-samples")
    return torch.tensor(ids[:need], dtype=torch.long).view(count, seq_len + 1)


def _indexed_windows(prefix: str, vocab_size: int, start: int, count: int, seq_len: int) -> torch.Tensor:
    import numpy as np

    from megatron_elastic.data.loader import PackedDataset

    ds = PackedDataset(prefix, seq_len)
    if len(ds) < start + count:
        raise UserError(
            f"--calib-data {prefix!r} holds {len(ds)} windows of {seq_len + 1} tokens; calibration and the held-out "
            f"loss need {start + count}: lower --calib-samples or give more data"
        )
    out = torch.from_numpy(np.stack([ds[i] for i in range(start, start + count)]).astype(np.int64))
    if int(out.max()) >= vocab_size:
        raise UserError(f"--calib-data {prefix!r} has token id {int(out.max())} >= the model's vocab_size {vocab_size}; "
                        "tokenize it with the model's tokenizer")  # fmt: skip
    return out


def data_windows(ckpt: Path, vocab_size: int, calib_data: str | None, calib_samples: int,
                 heldout_samples: int = DEFAULT_HELDOUT_SAMPLES, seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(calibration, held-out) token windows, each (n, seq_len + 1). Built-in corpus: train split for
    calibration, valid split held out; user data: the first windows calibrate, the next are held out."""
    if calib_data in (None, "", "builtin"):
        return (_builtin_windows(ckpt, vocab_size, "train", calib_samples, seq_len),
                _builtin_windows(ckpt, vocab_size, "valid", heldout_samples, seq_len))  # fmt: skip
    return (_indexed_windows(calib_data, vocab_size, 0, calib_samples, seq_len),
            _indexed_windows(calib_data, vocab_size, calib_samples, heldout_samples, seq_len))  # fmt: skip


@torch.no_grad()
def mean_loss(forward, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats/token) of ``forward(tokens) -> logits`` over ``windows`` (n, L + 1)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = forward(w[:, :-1]).float()
        total += float(cross_entropy(logits, w[:, 1:], reduction="sum"))
        count += w[:, 1:].numel()
    return total / count


# ---------------------------------------------------------------------- quantize + export
def _import_modelopt():
    with warnings.catch_warnings():  # version-compatibility chatter on import
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    return mtq, export_hf_checkpoint


def modelopt_config(mtq, fmt: str, options: dict) -> dict:
    cfg = copy.deepcopy({"fp8": mtq.FP8_DEFAULT_CFG, "int8": mtq.INT8_DEFAULT_CFG, "int4_awq": mtq.INT4_AWQ_CFG,
                         "nvfp4": mtq.NVFP4_DEFAULT_CFG}[fmt])  # fmt: skip
    if fmt == "int4_awq" and options.get("block_size", 128) != 128:
        for entry in cfg["quant_cfg"]:
            sizes = (entry.get("cfg") or {}).get("block_sizes") if isinstance(entry, dict) else None
            if sizes and -1 in sizes:
                sizes[-1] = options["block_size"]
    return cfg


def _fix_exclude_names(export_dir: Path) -> None:
    """Model-Optimizer 0.47 with transformers 5 appends an internal ``\\x00...sentinel`` marker to the
    excluded module names it writes; runtimes match these names literally, so cut the marker off."""
    def clean(names):
        return [n.split("\x00")[0].rstrip(".") for n in names]

    for name, keys in (("hf_quant_config.json", ("quantization", "exclude_modules")),
                       ("config.json", ("quantization_config", "ignore"))):  # fmt: skip
        path = export_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        node = data.get(keys[0])
        if isinstance(node, dict) and isinstance(node.get(keys[1]), list):
            node[keys[1]] = clean(node[keys[1]])
            path.write_text(json.dumps(data, indent=2) + "\n")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def quantize_and_export(child, fmt: str, options: dict, calib: torch.Tensor, heldout: torch.Tensor, dst: Path, *,
                        overwrite: bool = False, side_files_from: Path | None = None,
                        extra_files: dict[str, str] | None = None, log=print) -> dict:  # fmt: skip
    """Quantize ``child`` (a HybridLM) to ``fmt``, export it to ``dst`` (atomically) and return its report."""
    from transformers import NemotronHForCausalLM

    from megatron_elastic.convert.hf import save_hf
    from megatron_elastic.convert.native import copy_side_files
    from megatron_elastic.deploy.load import load_quantized
    from megatron_elastic.utils.io import atomic_directory

    mtq, export_hf_checkpoint = _import_modelopt()
    device = torch.device("cuda" if fmt == "nvfp4" else "cpu")
    child = child.float().eval()
    loss_child = mean_loss(child, heldout)
    unquantized_bytes = sum(t.numel() * t.element_size() for t in child.state_dict().values())
    with tempfile.TemporaryDirectory(prefix="megatron-elastic-quant-") as tmp:
        save_hf(child, Path(tmp) / "hf")
        hf = NemotronHForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).to(device).eval()
    batches = calib[:, :-1].to(device).split(4)

    def forward_loop(model):
        for b in batches:
            model(b, use_cache=False)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(hf, modelopt_config(mtq, fmt, options), forward_loop)
    calib_s = time.perf_counter() - t0
    loss_fake = mean_loss(lambda t: hf(t.to(device), use_cache=False).logits.cpu(), heldout)
    with atomic_directory(dst, overwrite=overwrite) as out:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_hf_checkpoint(hf, export_dir=out)
        _fix_exclude_names(out)
        if side_files_from is not None:
            copy_side_files(side_files_from, out)
        for name, content in (extra_files or {}).items():
            (out / name).write_text(content)
        # NVFP4 has no reader here (its codes only run in CUDA kernels): its change is measured on
        # Model-Optimizer's calibrated model instead of on the files.
        loss_export = None if fmt == "nvfp4" else mean_loss(load_quantized(out), heldout)
        report = {
            "format": fmt,
            "modelopt_algorithm": json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"],
            **({"int4_block_size": options["block_size"]} if "block_size" in options else {}),
            "calibration_windows": int(calib.shape[0]),
            "heldout_windows": int(heldout.shape[0]),
            "tokens_per_window": int(calib.shape[1] - 1),
            "calibration_seconds": round(calib_s, 2),
            "bytes_on_disk": dir_bytes(out),
            "weight_bytes": weight_bytes(out),
            "unquantized_weight_bytes": unquantized_bytes,
            "loss_unquantized": loss_child,
            "loss_modelopt_fake_quant": loss_fake,
            "loss_export": loss_export,
            "loss_change": (loss_fake if loss_export is None else loss_export) - loss_child,
        }
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["bytes_on_disk"] = dir_bytes(dst)
    return report


# ---------------------------------------------------------------------- the extract --quantize command
def cmd_extract_quantized(args) -> int:
    """``megatron-elastic extract ... --quantize FMT``: every chosen budget -> a quantized Hugging Face checkpoint."""
    from megatron_elastic.api import load_pretrained
    from megatron_elastic.convert.native import read_native_config
    from megatron_elastic.elastic import Architecture, child_config, extract
    from megatron_elastic.elastic.manyinone import read_metadata, select_budgets

    fmt = args.quantize
    check_format(fmt)
    if args.calib_samples < 1:
        raise UserError(f"--calib-samples {args.calib_samples} must be at least 1")
    heldout_samples = getattr(args, "heldout_samples", DEFAULT_HELDOUT_SAMPLES)
    if heldout_samples < 1:
        raise UserError(f"--heldout-samples {heldout_samples} must be at least 1")
    _check_calib_data(args.calib_data)
    ckpt = Path(args.checkpoint)
    meta = read_metadata(ckpt)
    parent_cfg = read_native_config(ckpt)
    archs = meta["architectures"]
    out = Path(args.out)
    targets = select_budgets(archs, args.budget, args.all, out)
    wanted = list(targets)
    for path in targets.values():
        if path.exists() and not args.overwrite:
            raise UserError(f"output directory {str(path)!r} already exists; choose a new path or pass --overwrite")
    plans = {}
    for key in wanted:
        arch = Architecture.from_dict(archs[key])
        cfg = child_config(parent_cfg, arch)
        plans[key] = (arch, cfg, check_child(fmt, cfg, f"budget {key}"))
    # All checks passed: now compute.
    parent = load_pretrained(ckpt, dtype=torch.float32)
    print(f"[quantize] {fmt} with nvidia-modelopt: calibrating on {args.calib_samples} windows of {SEQ_LEN} tokens "
          f"({args.calib_data or 'built-in corpus'}), held-out loss on {heldout_samples} windows", flush=True)  # fmt: skip
    calib, heldout = data_windows(ckpt, parent_cfg.vocab_size, args.calib_data, args.calib_samples, heldout_samples)
    reports = {}
    header = f"{'budget':>8}{'params':>12}{'bytes':>14}{'x unquant.':>11}{'loss':>9}{'quant loss':>11}{'change':>9}"
    rows = []
    for key, (arch, cfg, options) in plans.items():
        t0 = time.perf_counter()
        child = extract(parent, arch).eval()
        extra = {"architecture.json": json.dumps(arch.to_dict(), indent=2) + "\n"}
        rep = quantize_and_export(child, fmt, options, calib, heldout, targets[key], overwrite=args.overwrite,
                                  side_files_from=ckpt, extra_files=extra)  # fmt: skip
        rep["num_parameters"] = child.num_parameters()
        reports[key] = rep
        rows.append(f"{key:>8}{rep['num_parameters']:>12,}{rep['bytes_on_disk']:>14,}"
                    f"{rep['weight_bytes'] / rep['unquantized_weight_bytes']:>11.3f}{rep['loss_unquantized']:>9.4f}"
                    f"{rep['loss_unquantized'] + rep['loss_change']:>11.4f}{rep['loss_change']:>+9.4f}")  # fmt: skip
        print(f"[quantize] budget {key}: {fmt} -> {targets[key]} ({time.perf_counter() - t0:.1f}s)", flush=True)
    print(header)
    for row in rows:
        print(row)
    if args.all:
        summary = out / "quantization_report.json"
        fd, tmp = tempfile.mkstemp(prefix=".quantization_report.", dir=out)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": fmt, "checkpoint": str(ckpt), "budgets": reports}, f, indent=2)
        os.replace(tmp, summary)
        print(f"[quantize] report -> {summary}")
    return 0
