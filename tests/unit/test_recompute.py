"""Activation recomputation: gradients equal those without it (masks and a depth scale that carries a
router-like gradient included), and the bytes kept for backward, counted with saved-tensor hooks,
drop as promised (full: at most 1/8 of none at sequence 512)."""

import pytest
import torch
from reference import randomize_

from megatron_elastic.model.config import HybridConfig
from megatron_elastic.model.elastic_state import ElasticState, LayerMask
from megatron_elastic.model.hybrid import HybridLM, set_recompute

CFG = dict(pattern="M*-M-", vocab_size=61, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
           num_query_groups=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2,
           mamba_state_dim=8, mamba_chunk_size=16)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return randomize_(HybridLM(HybridConfig(**CFG)), seed=3)


def masked_state(model: HybridLM, logit: torch.Tensor) -> ElasticState:
    """Hidden, FFN, head and Mamba masks, and depth scales that depend on ``logit`` (as the router's do)."""
    c = model.config
    gen = torch.Generator().manual_seed(5)
    soft = lambda n: (torch.rand(n, generator=gen) > 0.3).float()  # noqa: E731
    scale = torch.sigmoid(logit)
    layers = []
    for i, layer in enumerate(model.layers):
        kind = layer.layer_type
        layers.append(LayerMask(
            ffn=soft(c.ffn_hidden_size) if kind == "-" else None,
            attn_heads=soft(c.num_attention_heads) if kind == "*" else None,
            mamba_heads=soft(c.mamba_num_heads) if kind == "M" else None,
            mamba_head_dim=soft(c.mamba_head_dim) if kind == "M" else None,
            keep=scale[i],
        ))  # fmt: skip
    return ElasticState(hidden=soft(c.hidden_size), layers=layers)


def gradients(model: HybridLM, mode: str, tokens: torch.Tensor, elastic: bool):
    set_recompute(model, mode)
    model.zero_grad(set_to_none=True)
    logit = torch.linspace(-1.0, 2.0, len(model.layers)).requires_grad_()
    state = masked_state(model, logit) if elastic else None
    loss = model(tokens, elastic=state).logsumexp(-1).mean()
    loss.backward()
    set_recompute(model, "none")
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if elastic:
        grads["<depth logit>"] = logit.grad.clone()
    return loss.detach(), grads


@pytest.mark.parametrize("elastic", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_gives_the_same_gradients(model, mode, elastic):
    tokens = torch.randint(0, CFG["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    ref_loss, ref = gradients(model, "none", tokens, elastic)
    loss, got = gradients(model, mode, tokens, elastic)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert got.keys() == ref.keys()
    for name in ref:
        assert ref[name].abs().sum() > 0, name  # every parameter (and the depth logit) takes part
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


def saved_bytes(model: HybridLM, mode: str, tokens: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward after one forward."""
    set_recompute(model, mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, elastic=masked_state(model, torch.zeros(len(model.layers), requires_grad=True))).sum()
    del loss
    set_recompute(model, "none")
    return sum(storages.values())


def test_saved_for_backward_bytes_drop(model):
    b, L = 1, 512
    tokens = torch.randint(0, CFG["vocab_size"], (b, L), generator=torch.Generator().manual_seed(2))
    none, selective, full = (saved_bytes(model, m, tokens) for m in ("none", "selective", "full"))
    block_inputs = len(model.layers) * b * L * CFG["hidden_size"] * 4
    # full keeps each block's input (and the head's inputs and logits, which no mode recomputes)
    assert block_inputs <= full <= none / 8, (none, selective, full)
    assert full < selective < none, (none, selective, full)
