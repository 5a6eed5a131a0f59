"""The mixture-of-experts mixer of ``E`` layers, with the numerics of Hugging Face NemotronH's MoE.

Per token ``x`` (after the block's pre-norm):

* router (fp32): ``s = sigmoid(W_r x)``; the choice adds the ``e_score_correction_bias`` (a buffer,
  moved by the auxiliary-loss-free balancing update, never by gradients); experts are split into
  ``moe_router_num_groups`` equal groups, each group scored by the sum of its two best biased
  scores, and only the best ``moe_router_group_topk`` groups may be picked from; the ``top_k`` best
  biased scores there select the experts, whose *unbiased* scores are the weights (normalised to
  sum to one with ``moe_norm_topk_prob``, then times ``moe_router_topk_scaling_factor``);
* routed experts: squared-ReLU MLPs without a gate, stored as ``(experts, out, in)`` tensors, reading
  and writing the latent space when ``moe_latent_size`` is set (``fc1_latent_proj`` before,
  ``fc2_latent_proj`` after);
* output: ``fc2(sum_k w_k expert_k(fc1(x))) + shared_expert(x)``.

Parameter names are nemotron_h's (``gate.weight``, ``gate.e_score_correction_bias``,
``experts.up_proj``, ``experts.down_proj``, ``shared_experts.up_proj``...), so conversion is a renaming
of prefixes, as for the other mixers.

Balancing (training only): every routed (token, slot) is counted per expert, and after each optimizer
step :func:`update_expert_bias` moves each expert's correction bias by ``rate`` towards balance,
``bias += rate * sign(balanced load - load)`` (the balanced load: every forward's routed slots shared
equally by the experts kept in it, so the mean load without elastic masks; an expert an elastic
budget dropped is not pushed up for the tokens it could not get) (the auxiliary-loss-free rule of DeepSeek-V3 that Nemotron 3
and megatron-core's ``moe_router_enable_expert_bias`` use; default rate 1e-3 as theirs: one step moves
a bias by far less than the spread of sigmoid scores, so routing changes gradually). Optionally a
load-balancing loss ``coeff * E * sum_e f_e P_e`` (``f_e`` the fraction of routed slots, ``P_e`` the mean
normalised score of expert ``e``) is added to the gradients through :class:`_AuxLossGradient`, without
changing the loss the trainer sees, as megatron-core's MoEAuxLossAutoScaler does. Under full
recomputation a block's forward runs twice, so its counts double: the sign rule does not change.

The experts run grouped: the (token, slot) pairs are sorted by expert once, and each expert multiplies
its contiguous run of tokens in one matmul (a loop over experts, none over tokens), as megatron-core's
sequential grouped MLP does; tokens routed nowhere cost nothing.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from megatron_elastic.model.config import HybridConfig, LayerDims
from megatron_elastic.model.elastic_state import LayerMask
from megatron_elastic.model.layers import MLP, recomputed


class _AuxLossGradient(torch.autograd.Function):
    """Identity on ``x``; in backward also sends a gradient of one into ``aux_loss`` (already weighted)."""

    @staticmethod
    def forward(ctx, x, aux_loss):
        ctx.save_for_backward(aux_loss)
        return x

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


class TopkRouter(nn.Module):
    """Sigmoid top-k routing with a score-correction bias and group-limited selection (fp32)."""

    aux_loss_coeff = 0.0  # set by set_moe_balancing (already divided by the micro-batches per step)

    def __init__(self, config: HybridConfig, dims: LayerDims):
        super().__init__()
        c = config
        self.num_experts, self.top_k = dims.num_moe_experts, dims.moe_router_topk
        self.num_groups, self.group_topk = c.moe_router_num_groups, c.moe_router_group_topk
        self.norm_topk_prob, self.scaling = c.moe_norm_topk_prob, float(c.moe_router_topk_scaling_factor)
        self.weight = nn.Parameter(torch.empty(self.num_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        # Routed slots per expert since the last bias update, and the slots a balanced router would have given
        # it (the forward's slots shared by the experts kept in it). Not saved: a checkpoint follows an update.
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("balanced_load", torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)

    def forward(self, x_TD: torch.Tensor, experts: torch.Tensor | None = None,
                top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """tokens (T, d) -> (scores (T, E) fp32, top-k weights (T, k) fp32, top-k expert indices (T, k)).

        ``experts`` (E,): the kept experts' mask (elastic): the choice runs over the kept ones only (the others
        score -inf, in group scores too), and each picked expert's weight is scaled by its mask value (1 for a
        hard mask), so a masked router equals the router of the sliced child. ``top_k``: experts per token
        (default the layer's)."""
        top_k = self.top_k if top_k is None else top_k
        logits = F.linear(x_TD.float(), self.weight.float())
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        kept = None if experts is None else experts.detach() > 0
        if kept is not None:
            choice = choice.masked_fill(~kept, float("-inf"))
        if self.num_groups > 1:
            per_group = choice.view(-1, self.num_groups, self.num_experts // self.num_groups)
            group_scores = per_group.topk(2, dim=-1).values.sum(-1)  # (T, groups)
            best = group_scores.topk(self.group_topk, dim=-1, sorted=False).indices
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            allowed = allowed.unsqueeze(-1).expand_as(per_group).reshape(-1, self.num_experts)
            choice = choice.masked_fill(~allowed, float("-inf"))
        indices = choice.topk(top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if experts is not None:
            weights = weights * experts.float()[indices]
        if kept is not None:
            scores = scores.masked_fill(~kept, 0.0)  # dropped experts take no part in the balancing loss
        if self.training and torch.is_grad_enabled():
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts).float()
            self.tokens_per_expert += counts
            n_kept = self.num_experts if kept is None else int(kept.sum())
            share = torch.full_like(counts, indices.numel() / n_kept)
            self.balanced_load += share if kept is None else share * kept
            if self.aux_loss_coeff > 0:
                loss = self.load_balancing_loss(scores, counts, n_kept)
                weights = _AuxLossGradient.apply(weights, self.aux_loss_coeff * loss)
        return scores, weights * self.scaling, indices

    def load_balancing_loss(self, scores: torch.Tensor, counts: torch.Tensor, num_experts: int | None = None) -> torch.Tensor:
        """``E * sum_e f_e * P_e``: 1 when balanced; ``f_e`` = share of routed slots, ``P_e`` = mean normalised
        score, ``E`` the experts taking part (``num_experts``, default all)."""
        f = counts / counts.sum()
        p = (scores / scores.sum(-1, keepdim=True)).mean(0)
        return (self.num_experts if num_experts is None else num_experts) * (f * p).sum()


class Experts(nn.Module):
    """``num_experts`` squared-ReLU MLPs: ``up_proj`` (E, F, in), ``down_proj`` (E, in, F), no biases."""

    def __init__(self, num_experts: int, input_size: int, ffn_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_size, input_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, input_size, ffn_size))

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                neurons: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """sum over k of weights[t, k] * expert_{indices[t, k]}(x[t]); (T, in) -> (T, in) in fp32.
        ``neurons`` (F,): the intermediate neurons every expert keeps (elastic mask)."""
        T, K = indices_TK.shape
        flat = indices_TK.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // K
        rows = x_TD[token]
        outs = []
        for e, part in enumerate(rows.split(counts)):
            if counts[e]:
                h = torch.square(F.relu(F.linear(part, self.up_proj[e])))
                if neurons is not None:
                    h = h * neurons.to(h.dtype)
                outs.append(F.linear(h, self.down_proj[e]))
        out = torch.zeros(T, x_TD.shape[-1], dtype=torch.float32, device=x_TD.device)
        if outs:
            out.index_add_(0, token, torch.cat(outs).float() * weights_TK.reshape(-1)[order, None])
        return out


class MoE(nn.Module):
    """The ``E`` mixer: router, routed experts (optionally in a latent space) and a shared expert."""

    recompute_core = False  # selective recomputation: the routed experts are recomputed in backward

    def __init__(self, config: HybridConfig, dims: LayerDims):
        super().__init__()
        c = config
        self.gate = TopkRouter(c, dims)
        self.experts = Experts(dims.num_moe_experts, c.moe_expert_input_size, dims.moe_ffn_hidden_size)
        self.shared_experts = MLP(c, dataclasses.replace(dims, ffn_hidden_size=dims.moe_shared_expert_intermediate_size))
        if c.moe_latent_size:
            self.fc1_latent_proj = nn.Linear(c.hidden_size, c.moe_latent_size, bias=c.mlp_bias)
            self.fc2_latent_proj = nn.Linear(c.moe_latent_size, c.hidden_size, bias=c.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def forward(self, hidden_BLD: torch.Tensor, mask: LayerMask | None = None) -> torch.Tensor:
        b, L, d = hidden_BLD.shape
        x = hidden_BLD.reshape(-1, d)
        m = mask if mask is not None else LayerMask()
        _, weights, indices = self.gate(x, m.moe_experts, m.moe_topk)
        routed = recomputed(self.recompute_core, self._routed, x, indices, weights, m.moe_ffn)
        shared = None if m.moe_shared_ffn is None else LayerMask(ffn=m.moe_shared_ffn)
        return routed.view(b, L, d) + self.shared_experts(hidden_BLD, shared)

    def _routed(self, x_TD: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                neurons: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        h = x_TD if self.fc1_latent_proj is None else self.fc1_latent_proj(x_TD)
        h = self.experts(h, indices, weights, neurons).to(x_TD.dtype)
        return h if self.fc2_latent_proj is None else self.fc2_latent_proj(h)


def set_moe_balancing(model: nn.Module, aux_loss_coeff: float, micro_batches: int = 1) -> None:
    """Weight of the load-balancing loss for every MoE router of ``model`` (0 = none), per micro-batch:
    the trainer averages ``micro_batches`` losses per step, so each contributes ``coeff / micro_batches``."""
    for module in model.modules():
        if isinstance(module, TopkRouter):
            module.aux_loss_coeff = float(aux_loss_coeff) / micro_batches


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float) -> None:
    """The auxiliary-loss-free balancing step (see the module docstring) for every MoE router of
    ``model``, then its counts restart."""
    for r in (m for m in model.modules() if isinstance(m, TopkRouter)):
        load, balanced = r.tokens_per_expert, r.balanced_load
        if rate > 0 and load.sum() > 0:
            r.e_score_correction_bias += rate * torch.sign(balanced - load)
        load.zero_()
        balanced.zero_()
