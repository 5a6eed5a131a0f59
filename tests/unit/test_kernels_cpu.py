"""The pure-PyTorch kernels in ``model/kernels.py`` against slow references: causal depthwise conv1d + SiLU
(both layouts) and the gated grouped RMSNorm, forward and gradients (gradcheck in float64, parity in fp32)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_elastic.model import kernels


def conv_ref(x_BLD, weight, bias):
    """Token-by-token causal depthwise conv + SiLU. x (b, L, D), weight (D, K)."""
    b, L, D = x_BLD.shape
    K = weight.shape[1]
    out = []
    for t in range(L):
        acc = torch.zeros(b, D, dtype=x_BLD.dtype) if bias is None else bias.expand(b, D).clone()
        for k in range(K):
            src = t - (K - 1) + k
            if src >= 0:
                acc = acc + weight[:, k] * x_BLD[:, src]
        out.append(acc)
    return F.silu(torch.stack(out, 1))


def conv_torch(x_BLD, weight, bias):
    """What layers.py computed before: mkldnn's F.conv1d in (b, D, L)."""
    x = x_BLD.transpose(1, 2)
    L = x.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=weight.shape[0])
    return F.silu(out[..., :L]).transpose(1, 2)


def norm_ref(y, z, weight, group_size, eps):
    """The plain-torch GatedGroupRMSNorm forward."""
    y32 = y.float() * F.silu(z.float())
    *lead, d = y32.shape
    g = y32.view(*lead, d // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * g.view(*lead, d)


def _conv_inputs(b, L, D, K, bias, dtype, seed=0, extra=5):
    gen = torch.Generator().manual_seed(seed)
    # x is a strided slice of a wider tensor, as the in_proj output split gives it
    wide = torch.randn(b, L, D + extra, generator=gen, dtype=dtype)
    w = torch.randn(D, K, generator=gen, dtype=dtype) * 0.5
    bvec = torch.randn(D, generator=gen, dtype=dtype) if bias else None
    return wide, w, bvec


def _grads(fn, wide, w, bvec, D, gout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (wide, w)]
    bl = None if bvec is None else bvec.detach().clone().requires_grad_(True)
    out = fn(leaves[0][..., 2 : 2 + D], leaves[1], bl)
    inputs = leaves + ([bl] if bl is not None else [])
    return [out, *torch.autograd.grad(out, inputs, gout)]


CONV_SHAPES = [(2, 16, 6, 4), (1, 3, 5, 4), (2, 1, 4, 4), (2, 9, 3, 1), (3, 7, 4, 2)]
CONV_IDS = ["L16-K4", "L-shorter-than-K", "L1", "K1", "K2"]


@pytest.mark.parametrize("b,L,D,K", CONV_SHAPES, ids=CONV_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_gradcheck(b, L, D, K, bias):
    wide, w, bvec = _conv_inputs(b, L, D, K, bias, torch.float64)
    wide.requires_grad_(True)
    w.requires_grad_(True)
    inputs = (wide, w) + ((bvec.requires_grad_(True),) if bias else ())

    def fn(wide, w, *rest):
        return kernels.causal_conv1d_silu_bld(wide[..., 2 : 2 + D], w, rest[0] if rest else None, "torch")

    assert torch.autograd.gradcheck(fn, inputs)
    torch.testing.assert_close(fn(*inputs), conv_ref(wide[..., 2 : 2 + D], w, bvec))


@pytest.mark.parametrize("b,L,D,K", CONV_SHAPES + [(2, 300, 96, 4)], ids=CONV_IDS + ["large"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_matches_f_conv1d_fp32(b, L, D, K, bias):
    wide, w, bvec = _conv_inputs(b, L, D, K, bias, torch.float32, seed=1)
    gout = torch.randn(b, L, D, generator=torch.Generator().manual_seed(7))
    new = _grads(lambda x, w, bv: kernels.causal_conv1d_silu_bld(x, w, bv, "torch"), wide, w, bvec, D, gout)
    old = _grads(conv_torch, wide, w, bvec, D, gout)
    for a, e in zip(new, old):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_conv_bdl_layout_matches_bld():
    wide, w, bvec = _conv_inputs(2, 33, 8, 4, True, torch.float32, seed=2)
    gout = torch.randn(2, 33, 8, generator=torch.Generator().manual_seed(3))
    bld = _grads(lambda x, w, bv: kernels.causal_conv1d_silu_bld(x, w, bv, "torch"), wide, w, bvec, 8, gout)
    bdl = _grads(
        lambda x, w, bv: kernels.causal_conv1d_silu(x.transpose(1, 2), w, bv, "torch").transpose(1, 2),
        wide, w, bvec, 8, gout,
    )  # fmt: skip
    for a, e in zip(bdl, bld):
        torch.testing.assert_close(a, e)
    # a contiguous (b, D, L) input too
    x = torch.randn(2, 8, 33, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        kernels.causal_conv1d_silu(x, w, bvec, "torch"), conv_torch(x.transpose(1, 2), w, bvec).transpose(1, 2)
    )


def test_conv_bf16_input_accumulates_in_fp32():
    wide, w, bvec = _conv_inputs(2, 20, 8, 4, True, torch.float32, seed=5)
    x = wide[..., :8].bfloat16()
    out = kernels.causal_conv1d_silu_bld(x, w, bvec, "torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), conv_ref(x.float(), w, bvec), rtol=1e-2, atol=1e-2)


NORM_SHAPES = [((2, 5, 12), 4), ((2, 5, 12), 12), ((3, 16), 8), ((2, 3, 4, 6), 3)]


@pytest.mark.parametrize("shape,group_size", NORM_SHAPES, ids=["groups3", "groups1", "2d", "4d"])
def test_norm_gradcheck(shape, group_size):
    gen = torch.Generator().manual_seed(0)
    y, z = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = (torch.rand(shape[-1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)

    def fn(y, z, w):
        return kernels.gated_group_rmsnorm(y, z, w, group_size, 1e-5)

    assert torch.autograd.gradcheck(fn, (y, z, w))
    # the reference computes in fp32 by design
    torch.testing.assert_close(fn(y, z, w), norm_ref(y, z, w, group_size, 1e-5).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,group_size", NORM_SHAPES + [((2, 64, 256), 128)], ids=["groups3", "groups1", "2d", "4d", "large"]
)
def test_norm_matches_plain_torch_fp32(shape, group_size):
    gen = torch.Generator().manual_seed(1)
    y0, z0, gout = (torch.randn(*shape, generator=gen) for _ in range(3))
    w0 = torch.rand(shape[-1], generator=gen) + 0.5
    results = []
    for fn in (kernels.gated_group_rmsnorm, norm_ref):
        y, z, w = (t.clone().requires_grad_(True) for t in (y0, z0, w0))
        out = fn(y, z, w, group_size, 1e-5)
        results.append([out, *torch.autograd.grad(out, (y, z, w), gout)])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_norm_rejects_bad_group_size():
    with pytest.raises(ValueError):
        kernels.gated_group_rmsnorm(torch.randn(2, 10), torch.randn(2, 10), torch.ones(10), 4, 1e-5)
