"""The chunked SSD scan against the token-by-token recurrence, forward and gradients."""

import pytest
import torch
from reference import ssd_sequential

from megatron_elastic.model.ssd import ssd_chunked


def _inputs(b, L, h, p, g, n, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(b, L, h, p, generator=gen),
        "dt": torch.rand(b, L, h, generator=gen) * 0.8 + 0.01,
        "A": -(torch.rand(h, generator=gen) * 2 + 0.05),
        "B": torch.randn(b, L, g, n, generator=gen),
        "C": torch.randn(b, L, g, n, generator=gen),
        "D": torch.randn(h, generator=gen),
    }
    for v in t.values():
        v.requires_grad_(requires_grad)
    return t


@pytest.mark.parametrize(
    "L,chunk,g",
    [(32, 8, 1), (37, 8, 2), (5, 16, 2), (64, 64, 4), (65, 16, 4)],
    ids=["multiple", "ragged", "shorter-than-chunk", "one-chunk", "one-past"],
)
def test_forward_matches_recurrence(L, chunk, g):
    t = _inputs(2, L, 8, 6, g, 5)
    init = torch.randn(2, 8, 6, 5)
    y, final = ssd_chunked(**t, chunk_size=chunk, initial_state=init, return_final_state=True)
    y_ref, final_ref = ssd_sequential(**t, initial_state=init)
    assert y.dtype == torch.float32 and y.shape == (2, L, 8, 6)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)


def test_without_skip_or_initial_state():
    t = _inputs(1, 20, 4, 3, 2, 4)
    D = t.pop("D")
    y = ssd_chunked(**t, chunk_size=8)
    y_ref, _ = ssd_sequential(**t)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    # D only adds D * x
    y_d = ssd_chunked(**t, D=D, chunk_size=8)
    torch.testing.assert_close(y_d - y, t["x"] * D[:, None])


def test_chunk_size_does_not_change_result():
    t = _inputs(2, 50, 4, 4, 2, 4, seed=3)
    ys = [ssd_chunked(**t, chunk_size=c) for c in (4, 7, 16, 64)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5)


def test_gradients_match_recurrence():
    t = _inputs(2, 23, 4, 3, 2, 4, seed=1, requires_grad=True)
    init = torch.randn(2, 4, 3, 4, requires_grad=True)
    w = torch.randn(2, 23, 4, 3)
    wf = torch.randn(2, 4, 3, 4)
    y, final = ssd_chunked(**t, chunk_size=8, initial_state=init, return_final_state=True)
    ((y * w).sum() + (final * wf).sum()).backward()
    grads = {k: v.grad.clone() for k, v in t.items()} | {"init": init.grad.clone()}
    for v in list(t.values()) + [init]:
        v.grad = None
    y_ref, final_ref = ssd_sequential(**t, initial_state=init)
    ((y_ref * w.double()).sum() + (final_ref * wf.double()).sum()).backward()
    for k, v in t.items():
        torch.testing.assert_close(grads[k].double(), v.grad.double(), rtol=1e-4, atol=1e-4, msg=f"grad {k}")
    torch.testing.assert_close(grads["init"].double(), init.grad.double(), rtol=1e-4, atol=1e-4)


def test_long_sequence_strong_decay_is_finite():
    # Large dt * |A| over many chunks: decays underflow to 0 but nothing may become inf/nan.
    t = _inputs(1, 300, 2, 2, 1, 2, seed=2)
    t["dt"] = t["dt"] * 20
    y = ssd_chunked(**t, chunk_size=32)
    y_ref, _ = ssd_sequential(**t)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
