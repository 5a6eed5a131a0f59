"""Slow references the fast paths are tested against."""

import math

import torch


def ssd_sequential(x, dt, A, B, C, *, D=None, initial_state=None):
    """Token-by-token Mamba-2 recurrence: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t.

    Shapes as ``megatron_elastic.model.ssd.ssd_chunked``; returns (y, final_state), fp64 inside.
    """
    b, L, h, p = x.shape
    g = B.shape[2]
    Bh = B.double().repeat_interleave(h // g, dim=2)  # (b, L, h, n)
    Ch = C.double().repeat_interleave(h // g, dim=2)
    n = B.shape[3]
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if initial_state is None else initial_state.double()
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t].double() * A.double())  # (b, h)
        inp = (dt[:, t, :, None].double() * x[:, t].double())[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = state * decay[..., None, None] + inp
        y = (state * Ch[:, t, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y = y + x[:, t].double() * D.double()[:, None]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a non-trivial random value so that each path (SSM decay, dt, gates,
    norms, biases) visibly matters; default inits leave the SSM contribution near zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
            if name.endswith("A_log"):
                p.copy_(r(p.shape) * 2.5 - 1.0)
            elif name.endswith("dt_bias"):
                p.copy_(r(p.shape) * 3.0 - 2.0)
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "conv1d.weight" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model
