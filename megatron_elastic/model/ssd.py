"""Chunked SSD scan (Mamba-2 state-space duality) in pure PyTorch.

The sequence is cut into chunks of ``Q`` tokens. Inside a chunk the scan is a masked matrix
product (the "quadratic" dual form); across chunks a small state ``(P, N)`` per head is passed on
with the chunk's total decay (Mamba-2 paper, Listing 1). Cost is O(L * Q) per head instead of a
Python loop over L tokens. Everything runs in fp32.

Shape letters: b batch, c chunk index, l/s positions inside a chunk (query / key side), g B/C
group, r head inside its group, h = g * r heads, p head channels, n state size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segsum_exp(a_cumsum: torch.Tensor) -> torch.Tensor:
    """exp(a_cumsum[..., l] - a_cumsum[..., s]) for l >= s, 0 above the diagonal.  (..., Q, Q)"""
    q = a_cumsum.shape[-1]
    diff = a_cumsum[..., :, None] - a_cumsum[..., None, :]
    causal = torch.ones(q, q, dtype=torch.bool, device=a_cumsum.device).tril()
    # Mask before exp: above the diagonal diff > 0 and exp could overflow.
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Selective scan  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t.

    Args:
        x: (b, L, h, p) head inputs.
        dt: (b, L, h) step sizes, already ``softplus(dt + dt_bias)`` and clamped.
        A: (h,) negative decay rates.
        B, C: (b, L, g, n) input / output projections, shared by the h/g heads of a group.
        D: (h,) skip weight, optional.
        initial_state: (b, h, p, n) state before the first token, optional.

    Returns ``y`` (b, L, h, p) in fp32, and the final state (b, h, p, n) if asked for.
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    Q = chunk_size
    pad = (-L) % Q
    nc = (L + pad) // Q
    x32, dt32 = x.float(), dt.float()

    # Discretise, then pad with zeros: a padded step has decay exp(0)=1 and input 0, so it changes
    # neither the outputs we keep nor the final state.
    xdt = x32 * dt32[..., None]  # (b, L, h, p)
    a = dt32 * A.float()  # (b, L, h)
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))

    # Heads as (g, r) so B/C broadcast over the r heads of their group without being copied.
    xdt = xdt.view(b, nc, Q, g, r, p).permute(0, 3, 4, 1, 2, 5)  # (b, g, r, c, Q, p)
    a_cs = a.view(b, nc, Q, g, r).permute(0, 3, 4, 1, 2).cumsum(-1)  # (b, g, r, c, Q)
    B_ = B.float().view(b, nc, Q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b, g, 1, c, Q, n)
    C_ = C.float().view(b, nc, Q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b, g, 1, c, Q, n)

    # 1. Within each chunk: y_diag = (C B^T  .*  decay(l, s)) x
    CB = C_ @ B_.transpose(-1, -2)  # (b, g, 1, c, Q, Q)
    y = (CB * _segsum_exp(a_cs)) @ xdt  # (b, g, r, c, Q, p)

    # 2. State each chunk hands on, from its own inputs: sum_s decay(end, s) x_s B_s^T
    decay_to_end = torch.exp(a_cs[..., -1:] - a_cs)  # (b, g, r, c, Q)
    states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B_  # (b, g, r, c, p, n)

    # 3. Pass states across chunks: state entering chunk c = sum_{k<=c} decay(c, k) states_k,
    #    computed as one small (c+1, c+1) matrix product per head.
    if initial_state is None:
        init = states.new_zeros(b, g, r, 1, p, n)
    else:
        init = initial_state.float().view(b, g, r, 1, p, n)
    states = torch.cat([init, states], dim=3)  # (b, g, r, c+1, p, n)
    chunk_decay = F.pad(a_cs[..., -1], (1, 0)).cumsum(-1)  # (b, g, r, c+1)
    passed = _segsum_exp(chunk_decay) @ states.flatten(-2)  # (b, g, r, c+1, p*n)
    passed = passed.view(b, g, r, nc + 1, p, n)
    entering, final_state = passed[:, :, :, :-1], passed[:, :, :, -1]

    # 4. Contribution of the entering state to each position: decay(l, start) C_l h_in
    y = y + (C_ @ entering.transpose(-1, -2)) * torch.exp(a_cs)[..., None]  # (b, g, r, c, Q, p)

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * Q, h, p)[:, :L]
    if D is not None:
        y = y + x32 * D.float()[:, None]
    if return_final_state:
        return y, final_state.reshape(b, h, p, n)
    return y

