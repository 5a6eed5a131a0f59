"""Reorder a parent's weights so that index order = importance order (function unchanged).

After :func:`permute_` every submodel of :mod:`megatron_elastic.elastic.space` (a prefix on each
axis, group-wise for heads) keeps the most important channels, neurons and heads. A ranking order
``o`` moves parent index ``o[k]`` to position ``k``; every tensor that touches an axis is permuted
the same way along it:

=================  ===============================================================================
axis               tensors (dimension permuted)
=================  ===============================================================================
hidden             embedding (cols), output layer (cols; nothing extra when tied), every RMSNorm
                   over the residual (block norms, final norm), in_proj / q / k / v / up (cols),
                   out_proj / o / down (rows and biases)
ffn                up_proj rows (+bias), down_proj cols
attention heads    q_proj row blocks, o_proj column blocks (heads move only inside their KV group;
                   k / v untouched)
Mamba heads        z and x row blocks and dt rows of in_proj (+bias), conv1d x channel blocks
                   (+bias), A_log / D / dt_bias, gated-norm weight blocks, out_proj column blocks
                   (heads move only inside their B/C group; B and C untouched)
Mamba channels     the same channel permutation inside every head of z / x rows, conv x channels,
                   gated-norm weight and out_proj columns
depth              not permuted (callers drop layers by the ranking's removal order)
=================  ===============================================================================

Why this is exact: RMSNorm means are permutation invariant; a Mamba head reads the B/C of its own
group, which heads keep; the gated norm's groups coincide with the B/C groups, so a group's
channel set is unchanged; an attention query head keeps its KV head.
"""

from __future__ import annotations

import torch

from megatron_elastic.elastic.importance import Ranking
from megatron_elastic.elastic.slicing import head_rows, mamba_channels
from megatron_elastic.model.config import ATTENTION, MLP
from megatron_elastic.model.hybrid import HybridLM


def _take_(tensor: torch.Tensor | None, index: torch.Tensor, dim: int) -> None:
    """tensor <- tensor.index_select(dim, index), in place (the Parameter object is kept)."""
    if tensor is None:
        return
    tensor.copy_(tensor.index_select(dim, index.to(tensor.device)))


@torch.no_grad()
def permute_(model: HybridLM, ranking: Ranking) -> HybridLM:
    """Permute every coupled tensor of ``model`` in place by ``ranking``; returns ``model``.

    Raises ConfigError if ``ranking`` does not fit the model's shapes or moves a head across groups.
    """
    cfg = model.config
    ranking.check(cfg)
    h = torch.tensor(ranking.hidden, dtype=torch.long)
    gn = cfg.mamba_num_groups * cfg.mamba_state_dim

    _take_(model.embedding.weight, h, 1)
    if model.output_layer is not None and model.output_layer.weight is not model.embedding.weight:
        _take_(model.output_layer.weight, h, 1)
    _take_(model.final_norm.weight, h, 0)

    for i, block in enumerate(model.layers):
        _take_(block.norm.weight, h, 0)
        m = block.mixer
        if block.layer_type == MLP:
            f = torch.tensor(ranking.ffn[i], dtype=torch.long)
            _take_(m.up_proj.weight, f, 0)
            _take_(m.up_proj.weight, h, 1)
            _take_(m.up_proj.bias, f, 0)
            _take_(m.down_proj.weight, h, 0)
            _take_(m.down_proj.weight, f, 1)
            _take_(m.down_proj.bias, h, 0)
        elif block.layer_type == ATTENTION:
            rows = head_rows(torch.tensor(ranking.attn_heads[i], dtype=torch.long), m.head_dim)
            _take_(m.q_proj.weight, rows, 0)
            _take_(m.q_proj.bias, rows, 0)
            for proj in (m.q_proj, m.k_proj, m.v_proj):
                _take_(proj.weight, h, 1)
            _take_(m.o_proj.weight, h, 0)
            _take_(m.o_proj.weight, rows, 1)
            _take_(m.o_proj.bias, h, 0)
        else:
            heads = torch.tensor(ranking.mamba_heads[i], dtype=torch.long)
            chans = torch.tensor(ranking.mamba_head_dim[i], dtype=torch.long)
            di = m.d_inner
            ch = mamba_channels(heads, chans, m.head_dim)  # new d_inner position -> old index
            bc = torch.arange(2 * gn)
            # in_proj -> [z, x, B, C, dt] = [d_inner, d_inner, G*N, G*N, H]; conv1d over [x, B, C]
            in_rows = torch.cat([ch, di + ch, 2 * di + bc, 2 * di + 2 * gn + heads])
            conv_rows = torch.cat([ch, di + bc])
            _take_(m.in_proj.weight, in_rows, 0)
            _take_(m.in_proj.weight, h, 1)
            _take_(m.in_proj.bias, in_rows, 0)
            _take_(m.conv1d.weight, conv_rows, 0)
            _take_(m.conv1d.bias, conv_rows, 0)
            for p in (m.dt_bias, m.A_log, m.D):
                _take_(p, heads, 0)
            _take_(m.norm.weight, ch, 0)
            _take_(m.out_proj.weight, h, 0)
            _take_(m.out_proj.weight, ch, 1)
            _take_(m.out_proj.bias, h, 0)
    return model
