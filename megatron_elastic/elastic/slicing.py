"""Zero-shot extraction: slice a (permuted) parent into a real, smaller :class:`HybridLM`.

Invariant (tested for every axis and their combination): for an architecture ``arch``,
``extract(parent, arch)(tokens) == parent(tokens, elastic=hard_state(config, arch))``.
"""

from __future__ import annotations

import torch

from megatron_elastic.elastic.space import Architecture, axes_of, child_config, layer_axes
from megatron_elastic.model.config import ATTENTION, MLP
from megatron_elastic.model.hybrid import HybridLM


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a head-major projection for the given heads: heads x head_dim blocks."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def mamba_channels(heads: torch.Tensor, chans: torch.Tensor, head_dim: int) -> torch.Tensor:
    """d_inner indices (head-major, like x and z) of the kept (head, channel) pairs."""
    return (heads[:, None] * head_dim + chans[None, :]).reshape(-1)


@torch.no_grad()
def extract(model: HybridLM, arch: Architecture) -> HybridLM:
    """A standalone child model holding the prefix slices of ``model`` that ``arch`` keeps."""
    cfg = model.config
    child = HybridLM(child_config(cfg, arch), init=False)
    parent = model.state_dict()
    hid = axes_of(cfg)["hidden"].indices(arch.hidden_size)
    out: dict[str, torch.Tensor] = {"embedding.weight": parent["embedding.weight"][:, hid],
                                    "final_norm.weight": parent["final_norm.weight"][hid]}  # fmt: skip
    if "output_layer.weight" in parent:
        out["output_layer.weight"] = parent["output_layer.weight"][:, hid]
    for new, old in enumerate(arch.kept_layers()):
        layer = arch.layers[old]
        src, dst = f"layers.{old}.", f"layers.{new}."
        p = {k[len(src):]: v for k, v in parent.items() if k.startswith(src)}
        o = {"norm.weight": p["norm.weight"][hid]}
        ax = layer_axes(cfg, old)
        if layer.kind == MLP:
            f = ax["ffn"].indices(layer.ffn_hidden_size)
            o["mixer.up_proj.weight"] = p["mixer.up_proj.weight"][f][:, hid]
            o["mixer.down_proj.weight"] = p["mixer.down_proj.weight"][hid][:, f]
            if "mixer.up_proj.bias" in p:
                o["mixer.up_proj.bias"] = p["mixer.up_proj.bias"][f]
                o["mixer.down_proj.bias"] = p["mixer.down_proj.bias"][hid]
        elif layer.kind == ATTENTION:
            rows = head_rows(ax["attn_heads"].indices(layer.num_attention_heads), cfg.head_dim)
            o["mixer.q_proj.weight"] = p["mixer.q_proj.weight"][rows][:, hid]
            o["mixer.k_proj.weight"] = p["mixer.k_proj.weight"][:, hid]
            o["mixer.v_proj.weight"] = p["mixer.v_proj.weight"][:, hid]
            o["mixer.o_proj.weight"] = p["mixer.o_proj.weight"][hid][:, rows]
        else:
            dims = cfg.layer_dims(old)
            P, di, gn = dims.mamba_head_dim, dims.mamba_d_inner, cfg.mamba_num_groups * cfg.mamba_state_dim
            heads = ax["mamba_heads"].indices(layer.mamba_num_heads)
            ch = mamba_channels(heads, ax["mamba_head_dim"].indices(layer.mamba_head_dim), P)
            bc = torch.arange(2 * gn)  # B and C: never trimmed
            # in_proj -> [z, x, B, C, dt] = [d_inner, d_inner, G*N, G*N, H]
            in_rows = torch.cat([ch, di + ch, 2 * di + bc, 2 * di + 2 * gn + heads])
            # conv1d over [x, B, C] = [d_inner, G*N, G*N]
            conv_rows = torch.cat([ch, di + bc])
            o["mixer.in_proj.weight"] = p["mixer.in_proj.weight"][in_rows][:, hid]
            o["mixer.conv1d.weight"] = p["mixer.conv1d.weight"][conv_rows]
            for name in ("dt_bias", "A_log", "D"):
                o[f"mixer.{name}"] = p[f"mixer.{name}"][heads]
            o["mixer.norm.weight"] = p["mixer.norm.weight"][ch]
            o["mixer.out_proj.weight"] = p["mixer.out_proj.weight"][hid][:, ch]
            if "mixer.in_proj.bias" in p:
                o["mixer.in_proj.bias"] = p["mixer.in_proj.bias"][in_rows]
                o["mixer.out_proj.bias"] = p["mixer.out_proj.bias"][hid]
            if "mixer.conv1d.bias" in p:
                o["mixer.conv1d.bias"] = p["mixer.conv1d.bias"][conv_rows]
        out.update({dst + k: v.clone() for k, v in o.items()})
    child.load_state_dict(out, strict=True)
    return child.to(next(model.parameters()).dtype).train(model.training)
