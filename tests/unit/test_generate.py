"""Incremental decoding (Mamba conv + SSM state, attention KV cache) equals full-sequence decoding:
logits within fp32 rounding, greedy tokens identical; prompts shorter and longer than the conv
kernel and than a scan chunk, batch > 1, a sequence fed in uneven pieces."""

import pytest
import torch
from reference import randomize_

from megatron_elastic.inference import greedy_generate
from megatron_elastic.model import HybridConfig, HybridLM

# Every mixer kind, GQA, 2 Mamba groups, conv kernel 4, scan chunks of 8 tokens (so prompts cross
# chunk boundaries and the prefill hands a state across chunks), biases everywhere.
CONFIG = dict(
    pattern="M*-M-*M", vocab_size=97, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6,
    num_query_groups=2, head_dim=10, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=2,
    mamba_state_dim=4, mamba_chunk_size=8, mlp_bias=True, mamba_proj_bias=True,
)  # fmt: skip
# Logits are O(5); a recurrence step and the chunked scan sum in different orders (fp32).
TOL = dict(rtol=0, atol=5e-5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(HybridLM(HybridConfig(**CONFIG)), seed=5).eval()


def tokens(batch, length, seed=0):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pieces", [[1] * 12, [3, 1, 1, 7], [2, 9, 1], [11, 1], [5, 5, 5, 5, 3]])
def test_pieces_equal_full_sequence(model, pieces):
    """Any split of a sequence: the first piece shorter or longer than the conv kernel (4) and a
    scan chunk (8); later multi-token pieces continue the conv, SSM and KV state."""
    seq = tokens(3, sum(pieces), seed=len(pieces))
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache()
        parts, start = [], 0
        for n in pieces:
            parts.append(model.forward_cached(seq[:, start:start + n], cache))
            start += n
    assert full.abs().max() > 1.0
    assert cache.seq_len == seq.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)


def test_cache_shapes(model):
    cache = model.new_cache()
    with torch.no_grad():
        model.forward_cached(tokens(2, 10), cache)
    kinds = [layer.layer_type for layer in model.layers]
    for kind, state in zip(kinds, cache.layers):
        if kind == "M":
            assert state.conv.shape == (2, 3, 48 + 2 * 2 * 4)  # kernel-1 inputs of [x, B, C]
            assert state.ssm.shape == (2, 8, 6, 4) and state.ssm.dtype == torch.float32
        elif kind == "*":
            assert state.k.shape == state.v.shape == (2, 2, 10, 10)
        else:
            assert state is None


@pytest.mark.parametrize("batch,prompt_len", [(1, 1), (1, 3), (4, 6), (2, 13)])
def test_greedy_cached_equals_full_sequence(model, batch, prompt_len):
    prompt = tokens(batch, prompt_len, seed=prompt_len)
    new = 15
    cached = greedy_generate(model, prompt, new)
    full = greedy_generate(model, prompt, new, use_cache=False)
    assert cached.shape == (batch, prompt_len + new) and cached.dtype == torch.long
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, full)
    # the greedy tokens are the argmax of the full-sequence logits of the generated sequence
    with torch.no_grad():
        logits = model(cached[:, :-1])
    assert torch.equal(logits[:, prompt_len - 1:].argmax(-1), cached[:, prompt_len:])
    assert len(set(cached[:, prompt_len:].flatten().tolist())) > 3  # not a degenerate constant output


def test_generation_logits_match_full_sequence(model):
    """Each single-token step's logits equal the full forward's logits at that position."""
    seq = tokens(2, 20, seed=7)
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache()
        steps = [model.forward_cached(seq[:, :5], cache)[:, -1]]
        steps += [model.forward_cached(seq[:, t:t + 1], cache)[:, -1] for t in range(5, 20)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], **TOL)


def test_zero_new_tokens_and_errors(model):
    prompt = tokens(2, 4)
    assert torch.equal(greedy_generate(model, prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompt, -1)
    with pytest.raises(ValueError, match="length 0"):
        greedy_generate(model, prompt[:, :0], 3)
    with pytest.raises(ValueError, match="integer tensor"):
        greedy_generate(model, prompt.float(), 3)
    with pytest.raises(ValueError, match="new_cache"):
        model.forward_cached(prompt, model.new_cache().__class__.empty(2))
    assert not model.training
