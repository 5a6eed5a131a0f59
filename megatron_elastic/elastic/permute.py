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
routed experts     router rows (gate.weight) and correction bias, dim 0 of both stacked expert tensors
                   (experts move only inside their routing group)
expert neurons     up_proj dim 1 and down_proj dim 2 of every routed expert (one order for all)
shared expert      its up_proj rows (+bias), down_proj cols
depth              not permuted (callers drop layers by the ranking's removal order)
=================  ===============================================================================

Why this is exact: RMSNorm means are permutation invariant; a Mamba head reads the B/C of its own
group, which heads keep; the gated norm's groups coincide with the B/C groups, so a group's
channel set is unchanged; an attention query head keeps its KV head; routing is over sets of experts, and group-limited
selection scores a group by its members' best scores, which a reordering inside the group keeps.
"""

from __future__ import annotations

import torch

from megatron_elastic.elastic.importance import Ranking
from megatron_elastic.model.config import ATTENTION, MLP, MOE
from megatron_elastic.model.hybrid import HybridLM
from megatron_elastic.model.layout import Index, LayerKeep, is_all, layer_plan, model_plan


def _take_(tensor: torch.Tensor, index: Index, dim: int) -> None:
    """tensor <- tensor.index_select(dim, index), in place (the Parameter object is kept)."""
    if isinstance(index, slice):  # ALL, or a permutation that is one ascending range: the identity
        assert is_all(index) or (index.start == 0 and index.stop == tensor.shape[dim]), (index, tensor.shape)
        return
    tensor.copy_(tensor.index_select(dim, index.to(tensor.device)))


def _order(order: list[int]) -> torch.Tensor:
    return torch.tensor(order, dtype=torch.long)


@torch.no_grad()
def permute_(model: HybridLM, ranking: Ranking) -> HybridLM:
    """Permute every coupled tensor of ``model`` in place by ``ranking``; returns ``model``.

    The permutation is the slice plan of :mod:`megatron_elastic.model.layout` with full-size orders.
    Raises ConfigError if ``ranking`` does not fit the model's shapes or moves a head across groups.
    """
    cfg = model.config
    ranking.check(cfg)
    h = _order(ranking.hidden)
    plan = model_plan(cfg, h)
    for i, kind in enumerate(cfg.layer_types):
        if kind == MLP:
            keep = LayerKeep(ffn=_order(ranking.ffn[i]))
        elif kind == ATTENTION:
            keep = LayerKeep(attn_heads=_order(ranking.attn_heads[i]))
        elif kind == MOE:
            keep = LayerKeep(moe_experts=_order(ranking.moe_experts[i]), moe_ffn=_order(ranking.moe_ffn[i]),
                             moe_shared_ffn=_order(ranking.moe_shared_ffn[i]))  # fmt: skip
        else:
            keep = LayerKeep(mamba_heads=_order(ranking.mamba_heads[i]),
                             mamba_head_dim=_order(ranking.mamba_head_dim[i]))  # fmt: skip
        plan.update({f"layers.{i}.{k}": v for k, v in layer_plan(cfg, i, h, keep).items()})
    done: set[int] = set()
    for name, cut in plan.items():
        owner, _, attr = name.rpartition(".")
        param = getattr(model.get_submodule(owner), attr)  # a parameter, or a buffer (the routing bias)
        if id(param) in done:  # one tensor under two names (an output layer tied by hand) moves once
            continue
        done.add(id(param))
        for index, dim in cut.dims:
            if dim < param.dim():
                _take_(param, index, dim)
    return model
