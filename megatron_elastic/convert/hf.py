"""Hugging Face ``nemotron_h`` <-> native: config translation and state-dict adapters.

Reads and writes the files directly (``config.json`` + safetensors, single or sharded), so
conversion does not need ``transformers``; the tests check both directions against it.

Weight names in a Hugging Face directory: NVIDIA's releases use ``backbone.``; ``transformers``
renames it to ``model.`` in memory. We read either and write ``backbone.`` (what released
checkpoints, ``transformers`` and vLLM all load).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch

from megatron_elastic.errors import CheckpointError, shown
from megatron_elastic.model.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from megatron_elastic.model.hybrid import HybridLM
from megatron_elastic.utils.io import (
    TensorFiles, atomic_directory, contained_path, load_safetensors, read_json, safetensors_keys, write_json,
)  # fmt: skip

from megatron_elastic.convert.native import copy_side_files, load_state_into, stored_dtype

_BLOCK_TYPES = {"linear_attention": MAMBA, "full_attention": ATTENTION, "mlp": MLP, "moe": MOE}
_LEGACY_SYMBOLS = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}
# nemotron_h's mixture-of-experts fields -> ours (megatron-core's names)
_MOE_KEYS = {
    "n_routed_experts": "num_moe_experts", "num_experts_per_tok": "moe_router_topk",
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    "n_group": "moe_router_num_groups", "topk_group": "moe_router_group_topk",
    "routed_scaling_factor": "moe_router_topk_scaling_factor", "norm_topk_prob": "moe_norm_topk_prob",
}  # fmt: skip
_BLOCK_NAMES = {v: k for k, v in _BLOCK_TYPES.items()}
# Older nemotron_h configs spell some fields differently (transformers maps them the same way).
_LEGACY_KEYS = {
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max", "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size",
}  # fmt: skip
HF_DEFAULTS = {  # NemotronHConfig defaults for fields a config.json may omit
    "num_key_value_heads": 8, "head_dim": 128, "mlp_bias": False, "ssm_state_size": 128,
    "mamba_num_heads": 128, "mamba_head_dim": 64, "n_groups": 8, "conv_kernel": 4, "chunk_size": 128,
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4, "use_conv_bias": True,
    "use_bias": False, "initializer_range": 0.02, "layer_norm_epsilon": 1e-5,
    "rescale_prenorm_residual": True, "tie_word_embeddings": False, "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu", "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
    "norm_topk_prob": True, "n_shared_experts": 1,
}  # fmt: skip


def is_hf_dir(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "nemotron_h"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _unsupported(src: str, what: str) -> CheckpointError:
    return CheckpointError(f"{src}: {what}")


def config_from_hf(hf: dict, *, src: str = "config.json") -> HybridConfig:
    """Translate a ``nemotron_h`` config.json dict into a :class:`HybridConfig`."""
    if hf.get("model_type") != "nemotron_h":
        raise _unsupported(src, f"model_type is {hf.get('model_type')!r}, expected 'nemotron_h'")
    hf = dict(hf)
    for old, new in _LEGACY_KEYS.items():
        if old in hf and new not in hf:
            hf[new] = hf.pop(old)
    get = lambda k: hf.get(k, HF_DEFAULTS.get(k))  # noqa: E731

    def number(key: str) -> float:
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _unsupported(src, f"{key}={shown(value)} is invalid; it must be a finite number")
        return float(value)

    def flag(key: str) -> bool:
        value = get(key)
        if not isinstance(value, bool):
            raise _unsupported(src, f"{key}={shown(value)} is invalid; it must be true or false")
        return value

    def whole(key: str, default=None) -> int:
        value = hf.get(key, default) if default is not None else get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _unsupported(src, f"{key}={shown(value)} is invalid; it must be an integer")
        return value

    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
        raise _unsupported(src, f"layers_block_type={shown(types)} is invalid; it must be a list of layer type names")
    if types:
        bad = sorted({t for t in types if t not in _BLOCK_TYPES})
        if bad:
            raise _unsupported(src, f"layer types {bad} are not supported (only mamba 'linear_attention', "
                                    "'full_attention', 'mlp' and 'moe' layers)")  # fmt: skip
        pattern = "".join(_BLOCK_TYPES[t] for t in types)
    elif hf.get("hybrid_override_pattern"):
        raw = hf["hybrid_override_pattern"]
        if not isinstance(raw, str):
            raise _unsupported(src, f"hybrid_override_pattern={shown(raw)} is invalid; it must be a string like "
                                    "'M-M*-'")  # fmt: skip
        bad = sorted({s for s in raw if s not in _LEGACY_SYMBOLS})
        if bad:
            raise _unsupported(src, f"hybrid_override_pattern symbols {bad} are not supported (only M, *, - "
                                    "and E)")  # fmt: skip
        pattern = raw
    else:
        raise _unsupported(src, "has neither layers_block_type nor hybrid_override_pattern")
    if get("mlp_hidden_act") != "relu2":
        raise _unsupported(src, f"mlp_hidden_act={get('mlp_hidden_act')!r} is not supported (only 'relu2')")
    if get("mamba_hidden_act") != "silu":
        raise _unsupported(src, f"mamba_hidden_act={get('mamba_hidden_act')!r} is not supported (only 'silu')")
    if hf.get("attention_bias"):
        warnings.warn("nemotron_h ignores attention_bias (its attention has no bias); ignoring it too")
    if hf.get("num_nextn_predict_layers"):
        warnings.warn("multi-token-prediction layers (num_nextn_predict_layers) are not converted; dropping them")
    for key in ("num_attention_heads", "hidden_size", "vocab_size"):
        if key not in hf:
            raise _unsupported(src, f"lacks {key!r}; it is not a complete nemotron_h config")
    heads, hidden = whole("num_attention_heads"), whole("hidden_size")
    if heads <= 0:
        raise _unsupported(src, f"num_attention_heads={heads} is invalid; it must be a positive integer")
    if "num_hidden_layers" in hf and whole("num_hidden_layers") != len(pattern):
        raise _unsupported(src, f"num_hidden_layers={hf['num_hidden_layers']} but the layer pattern has {len(pattern)} "
                                "layers; the config is inconsistent: fix one of them")  # fmt: skip
    head_dim = get("head_dim") or hidden // heads
    moe = {}
    if MOE in pattern:
        if get("n_shared_experts") != 1:
            raise _unsupported(src, f"n_shared_experts={shown(get('n_shared_experts'))} is not supported (nemotron_h "
                                    "builds exactly one shared expert)")  # fmt: skip
        typed = {"routed_scaling_factor": number, "norm_topk_prob": flag}
        moe = {ours: typed.get(theirs, whole)(theirs) for theirs, ours in _MOE_KEYS.items()}
        moe["moe_latent_size"] = 0 if hf.get("moe_latent_size") is None else whole("moe_latent_size")
    return HybridConfig(
        **moe,
        pattern=pattern,
        vocab_size=whole("vocab_size"),
        hidden_size=hidden,
        ffn_hidden_size=whole("intermediate_size", 21504),
        num_attention_heads=heads,
        num_query_groups=get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mamba_num_heads=get("mamba_num_heads"),
        mamba_head_dim=get("mamba_head_dim"),
        mamba_num_groups=get("n_groups"),
        mamba_state_dim=get("ssm_state_size"),
        mamba_conv_kernel=get("conv_kernel"),
        mamba_chunk_size=get("chunk_size"),
        mamba_dt_min=number("time_step_min"),
        mamba_dt_max=number("time_step_max"),
        mamba_dt_init_floor=number("time_step_floor"),
        # nemotron_h clamps dt to (time_step_min, inf) whatever time_step_limit says.
        mamba_dt_limit=(number("time_step_min"), math.inf),
        mamba_conv_bias=flag("use_conv_bias"),
        mamba_proj_bias=flag("use_bias"),
        mlp_bias=flag("mlp_bias"),
        norm_eps=number("layer_norm_epsilon"),
        init_std=number("initializer_range"),
        rescale_prenorm_residual=flag("rescale_prenorm_residual"),
        tie_embeddings=False,  # nemotron_h never ties; a tied source is untied on load
    )


def config_to_hf(config: HybridConfig, *, torch_dtype: str = "float32") -> dict:
    """A ``nemotron_h`` config.json dict for ``config`` (transformers 4.x/5.x and vLLM read it)."""
    c = config
    if c.is_heterogeneous:
        raise CheckpointError(
            "a heterogeneous model (per-layer sizes) cannot be expressed in nemotron_h, whose config has one "
            "size per layer type; export it in the native format (--format native)"
        )
    lo, hi = c.mamba_dt_limit
    if lo != c.mamba_dt_min or not math.isinf(hi):
        raise CheckpointError(
            f"model.mamba_dt_limit={[lo, hi]} cannot be expressed in nemotron_h, which always clamps dt to "
            f"[time_step_min, inf) = [{c.mamba_dt_min}, inf); set mamba_dt_limit to that before exporting"
        )
    types = [_BLOCK_NAMES[t] for t in c.layer_types]
    moe = {}
    if MOE in c.layer_types:
        moe = {theirs: getattr(c, ours) for theirs, ours in _MOE_KEYS.items()}
        moe.update(n_shared_experts=1, moe_latent_size=c.moe_latent_size or None)
    return {
        **moe,
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "torch_dtype": torch_dtype,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "layers_block_type": types,
        "hybrid_override_pattern": "".join(c.layer_types),
        "num_hidden_layers": c.num_layers,
        "intermediate_size": c.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": c.mlp_bias,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_query_groups,
        "head_dim": c.head_dim,
        "attention_bias": False,
        "mamba_num_heads": c.mamba_num_heads,
        "mamba_head_dim": c.mamba_head_dim,
        "n_groups": c.mamba_num_groups,
        "ssm_state_size": c.mamba_state_dim,
        "conv_kernel": c.mamba_conv_kernel,
        "chunk_size": c.mamba_chunk_size,
        "expand": max(1, c.mamba_d_inner // c.hidden_size),
        "mamba_hidden_act": "silu",
        "time_step_min": c.mamba_dt_min,
        "time_step_max": c.mamba_dt_max,
        "time_step_floor": c.mamba_dt_init_floor,
        "use_conv_bias": c.mamba_conv_bias,
        "use_bias": c.mamba_proj_bias,
        "layer_norm_epsilon": c.norm_eps,
        "initializer_range": c.init_std,
        "rescale_prenorm_residual": c.rescale_prenorm_residual,
        "residual_in_fp32": False,
        "tie_word_embeddings": False,
        "num_logits_to_keep": 1,
        "use_cache": True,
    }


# ---------------------------------------------------------------------- state dicts
_HF_TO_NATIVE = [
    (re.compile(r"^(?:backbone|model)\.embeddings\.weight$"), "embedding.weight"),
    (re.compile(r"^(?:backbone|model)\.norm_f\.weight$"), "final_norm.weight"),
    (re.compile(r"^lm_head\.weight$"), "output_layer.weight"),
    (re.compile(r"^(?:backbone|model)\.layers\.(\d+)\.(.+)$"), r"layers.\1.\2"),
]
_NATIVE_TO_HF = [
    (re.compile(r"^embedding\.weight$"), "backbone.embeddings.weight"),
    (re.compile(r"^final_norm\.weight$"), "backbone.norm_f.weight"),
    (re.compile(r"^output_layer\.weight$"), "lm_head.weight"),
    (re.compile(r"^layers\.(\d+)\.(.+)$"), r"backbone.layers.\1.\2"),
]
_IGNORED_HF = re.compile(r"^(?:mtp\.|(?:backbone|model)\.mtp)")


def _rename(key: str, rules) -> str | None:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return None


# Routed experts: one (out, in) matrix per expert in files (what released checkpoints, transformers'
# save_pretrained and vLLM use); one (experts, out, in) tensor per projection in the model.
_EXPERT_KEY = re.compile(r"^(layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)$")


def state_from_hf(hf_state: dict[str, torch.Tensor], *, src: str) -> dict[str, torch.Tensor]:
    out, experts = {}, {}
    for key, tensor in hf_state.items():
        if _IGNORED_HF.match(key):
            continue
        new = _rename(key, _HF_TO_NATIVE)
        if new is None:
            raise CheckpointError(f"{src}: unexpected tensor {key!r}; is this a nemotron_h checkpoint?")
        m = _EXPERT_KEY.match(new)
        if m:
            experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = tensor
        else:
            out[new] = tensor
    for name, per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            missing = sorted(set(range(max(per_expert) + 1)) - set(per_expert))
            raise CheckpointError(f"{src}: {name} lacks expert(s) {missing[:5]}; the checkpoint is incomplete")
        out[name] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out


def state_to_hf(state: dict[str, torch.Tensor], *, tied: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = _FUSED_EXPERTS.match(key)
        if m:
            for e in range(value.shape[0]):
                out[_rename(f"{m[1]}.{e}.{m[2]}.weight", _NATIVE_TO_HF)] = value[e]
        else:
            out[_rename(key, _NATIVE_TO_HF)] = value
    if tied:  # nemotron_h has no tying: write the shared matrix as the output layer too
        out["lm_head.weight"] = out["backbone.embeddings.weight"].clone()
    return out


def hf_weight_files(src: Path) -> dict[str, Path]:
    """Hugging Face tensor key -> the safetensors file holding it (the index's weight_map, or the keys of
    the single ``model.safetensors``)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{str(index)!r} has no weight_map; the index file is corrupt")
        return {key: contained_path(src, name, "safetensors shard") for key, name in weight_map.items()}
    if (src / "model.safetensors").is_file():
        return {key: src / "model.safetensors" for key in safetensors_keys(src / "model.safetensors")}
    if any(src.glob("*.bin")):
        raise CheckpointError(f"{src}: only PyTorch .bin weights found; re-save the model with safetensors "
                              "(save_pretrained(..., safe_serialization=True))")  # fmt: skip
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json; point at a complete "
                          "Hugging Face model directory")  # fmt: skip


def read_hf_weights(src: Path, *, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    files = hf_weight_files(src)
    state = {}
    for shard in sorted(set(files.values())):
        state.update(load_safetensors(shard, dtype=dtype))
    missing = sorted(set(files) - set(state))
    if missing:
        raise CheckpointError(f"{src}: tensors listed in the index are missing from the shards, e.g. {missing[:3]}")
    return state


def hf_tensor_files(src: str | Path) -> TensorFiles:
    """The tensors of a Hugging Face ``nemotron_h`` directory under their native names, read on demand
    (blocks of a tensor through a memory map); a tied source's output layer reads the embedding."""
    src = Path(src)
    entries = {}
    for key, path in hf_weight_files(src).items():
        if _IGNORED_HF.match(key):
            continue
        new = _rename(key, _HF_TO_NATIVE)
        if new is None:
            raise CheckpointError(f"{src}: unexpected tensor {key!r}; is this a nemotron_h checkpoint?")
        entries[new] = (path, key)
    tied = read_json(src / "config.json", "Hugging Face config").get("tie_word_embeddings")
    if "output_layer.weight" not in entries and tied and "embedding.weight" in entries:
        entries["output_layer.weight"] = entries["embedding.weight"]
    return TensorFiles(entries)


def load_hf(src: str | Path, *, dtype: torch.dtype | None = torch.float32) -> HybridLM:
    """Build a :class:`HybridLM` from a Hugging Face ``nemotron_h`` directory."""
    src = Path(src)
    hf_cfg = read_json(src / "config.json", "Hugging Face config")
    config = config_from_hf(hf_cfg, src=str(src / "config.json"))
    state = state_from_hf(read_hf_weights(src, dtype=dtype), src=str(src))
    if "output_layer.weight" not in state and hf_cfg.get("tie_word_embeddings"):
        state["output_layer.weight"] = state["embedding.weight"].clone()
    model = HybridLM(config, init=False).to(dtype or stored_dtype(state))
    load_state_into(model, state, str(src))
    return model


def save_hf(model: HybridLM, dst: str | Path, *, overwrite: bool = False, max_shard_size: str | int = "5GB",
            side_files_from: Path | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:  # fmt: skip
    """Write ``model`` as a Hugging Face ``nemotron_h`` directory (sharded past ``max_shard_size``), atomically."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    dst = Path(dst)
    config = config_to_hf(model.config)  # raises before anything is written
    state = state_to_hf({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                        tied=model.config.tie_embeddings)  # fmt: skip
    dtypes = {v.dtype for v in state.values()}
    config["torch_dtype"] = str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else "float32"
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)  # fmt: skip
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                        "weight_map": split.tensor_to_filename})  # fmt: skip
        write_json(tmp / "config.json", config)
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        for name, content in (extra_files or {}).items():  # e.g. architecture.json of an extracted child
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
    return dst
