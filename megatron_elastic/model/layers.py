"""Building blocks of the hybrid model: RMSNorm, gated grouped RMSNorm, Mamba-2 mixer, GQA attention
without positional encoding, squared-ReLU MLP.

Parameter names match Hugging Face NemotronH (``in_proj``, ``conv1d``, ``A_log``, ``q_proj``,
``up_proj``...) so that conversion is a renaming of prefixes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_elastic.model import kernels
from megatron_elastic.model.config import HybridConfig, LayerDims
from megatron_elastic.model.elastic_state import LayerMask


def recomputed(enabled: bool, function, *args):
    """``function(*args)``; with ``enabled`` (and gradients on) its intermediates are not kept for
    backward but recomputed there: only ``args`` are saved. torch's non-reentrant checkpoint, since
    mask tensors that carry the router's gradient reach ``function`` inside dataclasses, and the model
    has no dropout, so there is no random state to replay."""
    if not enabled or not torch.is_grad_enabled():
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32.

    With a channel mask ``m`` the mean runs over the kept channels only, sum(m x^2) / sum(m), and
    the output is masked: a masked norm equals the norm of the sliced vector.
    """

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x32 = x.float()
        if mask is None:
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (self.weight.float() * x32).to(x.dtype)
        m = mask.float()
        var = (x32.pow(2) * m).sum(-1, keepdim=True) / m.sum()
        return (self.weight.float() * x32 * torch.rsqrt(var + self.eps) * m).to(x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2 output norm: RMSNorm(y * silu(z)) over groups of ``group_size`` channels, in fp32.

    The gate is applied before normalising (mamba-ssm's ``norm_before_gate=False``).
    """

    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (d,): kept channels; each group's mean then runs over its kept channels only."""
        if mask is None:
            return kernels.gated_group_rmsnorm(y, z, self.weight, self.group_size, self.eps)
        y32 = y.float() * F.silu(z.float())
        *lead, d = y32.shape
        groups = d // self.group_size
        grouped = y32.view(*lead, groups, self.group_size)
        if mask is None:
            grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight.float() * grouped.view(*lead, d)
        m = mask.float().view(groups, self.group_size)
        var = (grouped.pow(2) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
        grouped = grouped * torch.rsqrt(var + self.eps) * m
        return self.weight.float() * grouped.view(*lead, d)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj -> causal conv1d + SiLU over [x, B, C] -> SSD scan -> gated norm -> out_proj.

    ``recompute_core`` (selective recomputation): conv, scan and gated norm are recomputed in
    backward from the in_proj output, so the scan's chunk intermediates are never kept."""

    recompute_core = False  # a class default: the tensor-parallel variants skip this __init__

    def __init__(self, config: HybridConfig, dims: LayerDims):
        super().__init__()
        c = config
        self.num_heads = dims.mamba_num_heads
        self.head_dim = dims.mamba_head_dim
        self.num_groups = c.mamba_num_groups
        self.state_dim = c.mamba_state_dim
        self.d_inner = dims.mamba_d_inner
        self.conv_dim = dims.mamba_conv_dim
        self.chunk_size = c.mamba_chunk_size
        self.dt_limit = tuple(c.mamba_dt_limit)
        # in_proj -> [z, x, B, C, dt] = [d_inner, d_inner, G*N, G*N, H]
        self.in_proj = nn.Linear(c.hidden_size, dims.mamba_in_proj_dim, bias=c.mamba_proj_bias)
        # depthwise conv over [x, B, C] = [d_inner, G*N, G*N]; weight (conv_dim, 1, kernel)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, c.mamba_conv_kernel, groups=self.conv_dim,
            padding=c.mamba_conv_kernel - 1, bias=c.mamba_conv_bias,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))  # (H,)
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))  # (H,)  A = -exp(A_log)
        self.D = nn.Parameter(torch.ones(self.num_heads))  # (H,)
        # Norm groups coincide with the B/C groups: group size d_inner / G.
        self.norm = GatedGroupRMSNorm(self.d_inner, self.d_inner // self.num_groups, c.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, c.hidden_size, bias=c.mamba_proj_bias)

    def channel_mask(self, mask: LayerMask | None) -> torch.Tensor | None:
        """(d_inner,) mask of the kept (head, channel) pairs, laid out head-major like x and z."""
        if mask is None or (mask.mamba_heads is None and mask.mamba_head_dim is None):
            return None
        heads = mask.mamba_heads if mask.mamba_heads is not None else torch.ones(self.num_heads)
        chans = mask.mamba_head_dim if mask.mamba_head_dim is not None else torch.ones(self.head_dim)
        return (heads.float()[:, None] * chans.float().to(heads.device)[None, :]).reshape(-1)

    def forward(self, hidden_BLD: torch.Tensor, mask: LayerMask | None = None) -> torch.Tensor:
        # Heads and head channels are independent through conv, scan and gate (only B/C are
        # shared, and they are never masked), so masking the gated output y * silu(z) and
        # normalising over the kept channels equals running the sliced mixer.
        zxbcdt = self.in_proj(hidden_BLD)
        y = recomputed(self.recompute_core, self._core, zxbcdt, self.channel_mask(mask))
        return self.out_proj(y.to(hidden_BLD.dtype))

    def _core(self, zxbcdt: torch.Tensor, channel_mask: torch.Tensor | None) -> torch.Tensor:
        """in_proj output (b, L, in_proj_dim) -> gated, normalised scan output (b, L, d_inner) fp32."""
        b, L, _ = zxbcdt.shape
        backend = kernels.backend_for(zxbcdt)
        z, xBC, dt_raw = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        xBC = kernels.causal_conv1d_silu_bld(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, backend)  # (b, L, conv_dim)
        gn = self.num_groups * self.state_dim
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        y = kernels.ssd_scan(
            x.reshape(b, L, self.num_heads, self.head_dim),
            dt_raw,
            -torch.exp(self.A_log.float()),
            B.reshape(b, L, self.num_groups, self.state_dim),
            C.reshape(b, L, self.num_groups, self.state_dim),
            self.D,
            self.dt_bias,
            dt_limit=self.dt_limit,
            chunk_size=self.chunk_size,
            backend=backend,
        )  # (b, L, H, P) fp32
        return self.norm(y.reshape(b, L, self.d_inner), z, channel_mask)

    def forward_cached(self, hidden_BLD: torch.Tensor, state=None):
        """``forward`` continued from a decoding ``state`` (:class:`~megatron_elastic.model.cache.MambaState`,
        None at the start of a sequence). Returns (output, state after the last token). No masks:
        incremental decoding runs standalone (extracted or view) children. Pure-PyTorch path on every device.
        """
        from megatron_elastic.model.cache import MambaState
        from megatron_elastic.model.ssd import ssd_chunked

        b, L, _ = hidden_BLD.shape
        K = self.conv1d.weight.shape[-1]
        zxbcdt = self.in_proj(hidden_BLD)
        z, xBC, dt_raw = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        # The conv window: the K-1 previous inputs (zeros at the start, as the conv's left padding).
        prev = xBC.new_zeros(b, K - 1, self.conv_dim) if state is None else state.conv.to(xBC.dtype)
        conv_in = torch.cat([prev, xBC], dim=1)  # (b, K-1+L, conv_dim)
        weight = self.conv1d.weight.reshape(self.conv_dim, K)
        xBC = kernels.causal_conv1d_silu_bld(conv_in, weight, self.conv1d.bias, "torch")[:, K - 1:]
        conv_state = conv_in[:, conv_in.shape[1] - (K - 1):].clone()  # clone: do not pin the prompt's buffer
        gn = self.num_groups * self.state_dim
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        x = x.reshape(b, L, self.num_heads, self.head_dim)
        B = B.reshape(b, L, self.num_groups, self.state_dim)
        C = C.reshape(b, L, self.num_groups, self.state_dim)
        dt = F.softplus(dt_raw.float() + self.dt_bias.float()).clamp(min=self.dt_limit[0], max=self.dt_limit[1])  # (b, L, H)
        A = -torch.exp(self.A_log.float())
        ssm = None if state is None else state.ssm
        if L == 1:  # one recurrence step: h = exp(dt A) h + dt x B^T,  y = h C + D x
            if ssm is None:
                ssm = x.new_zeros(b, self.num_heads, self.head_dim, self.state_dim, dtype=torch.float32)
            r = self.num_heads // self.num_groups
            Bh = B[:, 0].float().repeat_interleave(r, dim=1)  # (b, H, N): head j reads group j // r
            Ch = C[:, 0].float().repeat_interleave(r, dim=1)
            dt0, x0 = dt[:, 0], x[:, 0].float()  # (b, H), (b, H, P)
            ssm = ssm * torch.exp(dt0 * A)[..., None, None] + (dt0[..., None] * x0)[..., None] * Bh[:, :, None, :]
            y = (torch.matmul(ssm, Ch[..., None]).squeeze(-1) + self.D.float()[:, None] * x0)[:, None]  # (b, 1, H, P)
        else:
            y, ssm = ssd_chunked(x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D, initial_state=ssm,
                                 return_final_state=True)  # fmt: skip
        y = self.norm(y.reshape(b, L, self.d_inner), z)
        return self.out_proj(y.to(hidden_BLD.dtype)), MambaState(conv=conv_state, ssm=ssm)


class Attention(nn.Module):
    """Causal grouped-query self-attention, no positional encoding (order comes from the Mamba layers).

    ``recompute_core`` (selective recomputation): the attention core is recomputed in backward from
    q, k, v, so the attention weights (the math path's (L, L) matrices) are never kept."""

    recompute_core = False  # a class default: the tensor-parallel variants skip this __init__

    def __init__(self, config: HybridConfig, dims: LayerDims):
        super().__init__()
        c = config
        self.num_heads = dims.num_attention_heads
        self.num_kv_heads = c.num_query_groups
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, hidden_BLD: torch.Tensor, mask: LayerMask | None = None) -> torch.Tensor:
        b, L, _ = hidden_BLD.shape
        q = self.q_proj(hidden_BLD).view(b, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_BLD).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_BLD).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        heads = None if mask is None else mask.attn_heads
        return self.o_proj(recomputed(self.recompute_core, self._core, q, k, v, heads))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor | None) -> torch.Tensor:
        """q (b, heads, L, hd), k and v (b, kv_heads, L, hd) -> (b, L, heads * hd)."""
        b, _, L, _ = q.shape
        # query head j reads KV head j // (num_heads / num_kv_heads)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (b, heads, L, head_dim)
        if heads is not None:  # heads are independent: mask their outputs
            out = out * heads.to(out.dtype)[None, :, None, None]
        return out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim)

    def forward_cached(self, hidden_BLD: torch.Tensor, state=None):
        """``forward`` continued from a :class:`~megatron_elastic.model.cache.KVCache` (None at the
        start). Returns (output, cache with this call's keys and values appended). No masks."""
        from megatron_elastic.model.cache import KVCache

        b, L, _ = hidden_BLD.shape
        q = self.q_proj(hidden_BLD).view(b, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_BLD).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_BLD).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past = 0
        if state is not None:
            past = state.k.shape[2]
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)  # (b, kv_heads, past + L, hd)
        mask = None
        if L > 1 and past > 0:  # query i sits at position past + i and sees keys 0 .. past + i
            mask = torch.ones(L, past + L, dtype=torch.bool, device=q.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=L > 1 and past == 0, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (b, heads, L, head_dim); a single query sees every cached key
        out = self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))
        return out, KVCache(k=k, v=v)


class MLP(nn.Module):
    """down(relu(up(x))^2): squared-ReLU, no gate.

    ``recompute_core`` (selective recomputation): the squared ReLU is recomputed in backward from
    the up-projection's output, so its two FFN-wide intermediates are never kept."""

    recompute_core = False  # a class default: the tensor-parallel variants skip this __init__

    def __init__(self, config: HybridConfig, dims: LayerDims):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, dims.ffn_hidden_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(dims.ffn_hidden_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden_BLD: torch.Tensor, mask: LayerMask | None = None) -> torch.Tensor:
        neurons = None if mask is None else mask.ffn
        return self.down_proj(recomputed(self.recompute_core, _squared_relu, self.up_proj(hidden_BLD), neurons))


def _squared_relu(up: torch.Tensor, neurons: torch.Tensor | None) -> torch.Tensor:
    act = torch.square(F.relu(up))
    return act if neurons is None else act * neurons.to(act.dtype)
