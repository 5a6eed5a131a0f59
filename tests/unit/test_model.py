"""The reference model: shapes, causality, batch independence, initialisation, kernel selection."""

import math

import pytest
import torch
from reference import randomize_

from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, preset
from megatron_elastic.model import kernels
from megatron_elastic.model.layers import GatedGroupRMSNorm, Mamba2Mixer

CFG = dict(
    pattern="M*-M", vocab_size=97, hidden_size=32, ffn_hidden_size=40, num_attention_heads=6, num_query_groups=3,
    head_dim=10, mamba_num_heads=6, mamba_head_dim=8, mamba_num_groups=3, mamba_state_dim=4, mamba_chunk_size=8,
)  # fmt: skip


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize_(HybridLM(HybridConfig(**CFG)), seed=1).eval()


def test_logits_shape_and_dtype(model):
    tokens = torch.randint(0, 97, (3, 19))
    logits = model(tokens)
    assert logits.shape == (3, 19, 97) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_causal(model):
    tokens = torch.randint(0, 97, (1, 30))
    changed = tokens.clone()
    changed[0, 17:] = (changed[0, 17:] + 5) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :17], b[:, :17], rtol=0, atol=1e-6)
    assert (a[:, 17] - b[:, 17]).abs().max() > 1e-3  # the changed token itself does matter


def test_batch_rows_are_independent(model):
    tokens = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        full = model(tokens)
        rows = torch.cat([model(tokens[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(full, rows, rtol=1e-5, atol=1e-5)


def test_bad_token_tensor(model):
    with pytest.raises(ValueError, match=r"integer tensor of shape \(batch, length\)"):
        model(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(batch, length\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_every_parameter_gets_a_gradient(model):
    model.train()
    model(torch.randint(0, 97, (2, 17))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_nemotron_h_initialisation():
    torch.manual_seed(0)
    cfg = HybridConfig(**CFG)
    m = HybridLM(cfg)
    mixers = [layer.mixer for layer in m.layers if isinstance(layer.mixer, Mamba2Mixer)]
    assert len(mixers) == 2
    for mixer in mixers:
        torch.testing.assert_close(mixer.A_log.exp(), torch.arange(1, 7, dtype=torch.float32))
        torch.testing.assert_close(mixer.D, torch.ones(6))
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert (dt >= cfg.mamba_dt_min * 0.999).all() and (dt <= cfg.mamba_dt_max * 1.001).all()
        # kaiming-uniform(a=sqrt(5)) bound is 1/sqrt(fan_in), then divided by sqrt(num_layers)
        bound = 1 / math.sqrt(cfg.mamba_d_inner) / math.sqrt(cfg.num_layers)
        assert mixer.out_proj.weight.abs().max() <= bound + 1e-7
        assert mixer.out_proj.weight.abs().max() > 0.5 * bound
        torch.testing.assert_close(mixer.norm.weight, torch.ones(cfg.mamba_d_inner))
    q = m.layers[1].mixer.q_proj.weight
    assert abs(q.std().item() - cfg.init_std) < 0.1 * cfg.init_std
    assert abs(m.embedding.weight.std().item() - cfg.init_std) < 0.05 * cfg.init_std


def test_tied_embeddings_share_storage():
    m = HybridLM(HybridConfig(**(CFG | {"tie_embeddings": True})))
    assert m.output_layer is None and m.output_weight() is m.embedding.weight
    assert "output_layer.weight" not in m.state_dict()


def test_gated_norm_normalises_each_group_separately():
    norm = GatedGroupRMSNorm(12, group_size=4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 12))
    y, z = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    out = norm(y, z)
    gated = (y * torch.sigmoid(z) * z).view(2, 5, 3, 4)
    expected = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected.view(2, 5, 12) * norm.weight)


def test_kernel_selection_on_cpu(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "mamba_ssm")
    with pytest.raises(ConfigError, match="cannot run here"):
        kernels.backend_for(x)
    monkeypatch.setenv(kernels.ENV_VAR, "cuda-please")
    with pytest.raises(ConfigError, match="use auto, torch or mamba_ssm"):
        kernels.backend_for(x)


def test_tiny_preset_trains(model):
    # A few optimizer steps on a fixed batch must reduce the loss: gradients point somewhere useful.
    torch.manual_seed(0)
    m = HybridLM(preset("tiny"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    tokens = torch.randint(0, 512, (4, 33))
    losses = []
    for _ in range(8):
        logits = m(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(512), rel=0.05)
    assert losses[-1] < losses[0] - 0.5
