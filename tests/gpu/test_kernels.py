"""GPU checks (marked ``gpu``; skipped without CUDA): the CUDA path against the CPU reference, and
the mamba-ssm / causal-conv1d kernels against our pure-PyTorch scan."""

import pytest
import torch
from reference import randomize_

from megatron_elastic.model import HybridConfig, HybridLM
from megatron_elastic.model import kernels

pytestmark = pytest.mark.gpu

CFG = dict(
    pattern="M-M*-M", vocab_size=256, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8,
    num_query_groups=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=32, mamba_num_groups=2,
    mamba_state_dim=32, mamba_chunk_size=64,
)  # fmt: skip


def _model():
    torch.manual_seed(0)
    return randomize_(HybridLM(HybridConfig(**CFG)), seed=0).eval()


def test_torch_path_on_cuda_matches_cpu(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    cpu = _model()
    tokens = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        expected = cpu(tokens)
        got = cpu.cuda()(tokens.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


def test_mamba_ssm_kernels_match_torch_scan(monkeypatch):
    if not kernels.kernels_available():
        pytest.skip("mamba-ssm / causal-conv1d not installed (pip install -e '.[gpu]' --no-build-isolation)")
    model = _model().cuda()
    tokens = torch.randint(0, 256, (2, 150), device="cuda")
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    ref = model(tokens)
    ref.float().pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setenv(kernels.ENV_VAR, "mamba_ssm")
    assert kernels.backend_for(tokens) == "mamba_ssm"
    out = model(tokens)
    out.float().pow(2).mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=2e-3)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-2, atol=1e-3, msg=name)
