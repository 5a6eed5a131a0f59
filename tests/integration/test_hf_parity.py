"""Parity with Hugging Face transformers' NemotronHForCausalLM (its pure-PyTorch CPU path).

Random tiny nemotron_h models are saved with ``save_pretrained`` and loaded by us; our exports are
loaded by transformers. fp32 logits must agree to 1e-4 (measured: ~1e-6).
"""

import json

import pytest
import torch
from reference import randomize_
from transformers import NemotronHConfig, NemotronHForCausalLM

import megatron_elastic
from megatron_elastic.convert import load_hf, save_hf
from megatron_elastic.model import HybridLM, preset

TOL = 1e-4
_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}

# Each config covers a different corner: group counts, GQA ratios, head_dim != hidden/heads,
# chunk sizes that do and do not divide the sequence, patterns starting/ending with each type.
CONFIGS = {
    "groups1-mha-start-M-end-M": dict(pattern="M*-M", hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                                      head_dim=12, mamba_num_heads=4, mamba_head_dim=12, n_groups=1,
                                      ssm_state_size=8, chunk_size=8, intermediate_size=64),
    "groups2-gqa-start-attn-end-attn": dict(pattern="*M-M*", hidden_size=64, num_attention_heads=6,
                                            num_key_value_heads=2, head_dim=24, mamba_num_heads=8,
                                            mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=16,
                                            intermediate_size=96),
    "groups4-mqa-start-mlp-end-mlp": dict(pattern="-M*M-", hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=1, head_dim=20, mamba_num_heads=8, mamba_head_dim=8,
                                          n_groups=4, ssm_state_size=4, chunk_size=8, intermediate_size=80,
                                          mlp_bias=True, use_bias=True),
    "nemotron-like-start-M-end-mlp": dict(pattern="M-M*-M-", hidden_size=64, num_attention_heads=8,
                                          num_key_value_heads=2, head_dim=16, mamba_num_heads=16, mamba_head_dim=8,
                                          n_groups=8, ssm_state_size=8, chunk_size=32, intermediate_size=128,
                                          use_conv_bias=False, layer_norm_epsilon=1e-6),
    # Mixture-of-experts layers mixed with the dense ones (the Nemotron 3 family): grouped routing with a
    # latent space and a scaling factor; ungrouped without normalisation, with MLP biases; top-1 of 16.
    "moe-groups-latent-scaled": dict(pattern="ME*E-E", hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=12, mamba_num_heads=4, mamba_head_dim=12, n_groups=2, ssm_state_size=8,
                                     chunk_size=8, intermediate_size=64, n_routed_experts=8, num_experts_per_tok=3,
                                     moe_intermediate_size=20, moe_shared_expert_intermediate_size=36, n_group=4,
                                     topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, moe_latent_size=24),
    "moe-ungrouped-unnormalised-bias": dict(pattern="EM-E*", hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=4, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                                            n_groups=1, ssm_state_size=8, chunk_size=8, intermediate_size=40,
                                            n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                                            moe_shared_expert_intermediate_size=24, norm_topk_prob=False,
                                            mlp_bias=True),
    "moe-top1-of-16": dict(pattern="M*EE", hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=4, chunk_size=16,
                           intermediate_size=32, n_routed_experts=16, num_experts_per_tok=1, moe_intermediate_size=8,
                           moe_shared_expert_intermediate_size=12, n_group=2, topk_group=1),
}  # fmt: skip
SEQ_LENS = (16, 37)  # 16: a multiple of every chunk size above; 37: a multiple of none


def hf_model(spec: dict, seed: int = 0) -> NemotronHForCausalLM:
    spec = dict(spec)
    pattern = spec.pop("pattern")
    cfg = NemotronHConfig(vocab_size=211, layers_block_type=[_TYPES[s] for s in pattern], **spec)
    torch.manual_seed(seed)
    model = randomize_(NemotronHForCausalLM(cfg), seed=seed).eval()
    with torch.no_grad():  # the routers' score-correction biases are buffers: give them values too
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def tokens_for(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 211, (2, length), generator=torch.Generator().manual_seed(seed + length))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_ours(name, tmp_path):
    ref = hf_model(CONFIGS[name])
    ref.save_pretrained(tmp_path / "hf")
    ours = megatron_elastic.load_pretrained(tmp_path / "hf")
    assert ours.config.pattern == CONFIGS[name]["pattern"]
    for length in SEQ_LENS:
        t = tokens_for(length)
        with torch.no_grad():
            expected, got = ref(t).logits, ours(t)
        assert expected.abs().max() > 1.0  # non-trivial logits
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_to_hf(name, tmp_path):
    ref = hf_model(CONFIGS[name], seed=1)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    save_hf(ours, tmp_path / "export")
    exported = NemotronHForCausalLM.from_pretrained(tmp_path / "export").eval()
    for length in SEQ_LENS:
        t = tokens_for(length, seed=1)
        with torch.no_grad():
            torch.testing.assert_close(exported(t).logits, ours(t), rtol=0, atol=TOL)


def test_natively_built_model_exports(tmp_path):
    torch.manual_seed(3)
    ours = randomize_(HybridLM(preset("tiny")), seed=3).eval()
    save_hf(ours, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and cfg["hybrid_override_pattern"] == "M-M*-M-"
    exported = NemotronHForCausalLM.from_pretrained(tmp_path / "export").eval()
    t = torch.randint(0, 512, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(exported(t).logits, ours(t), rtol=0, atol=TOL)


def test_tied_model_exports_untied(tmp_path):
    torch.manual_seed(4)
    cfg = preset("tiny")
    cfg.tie_embeddings = True
    ours = randomize_(HybridLM(cfg), seed=4).eval()
    save_hf(ours, tmp_path / "export")
    exported = NemotronHForCausalLM.from_pretrained(tmp_path / "export").eval()
    t = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(exported(t).logits, ours(t), rtol=0, atol=TOL)
    torch.testing.assert_close(exported.lm_head.weight, ours.embedding.weight)


def test_sharded_export_round_trip(tmp_path):
    torch.manual_seed(5)
    ours = randomize_(HybridLM(preset("tiny")), seed=5).eval()
    save_hf(ours, tmp_path / "sharded", max_shard_size=200_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    exported = NemotronHForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    back = load_hf(tmp_path / "sharded")
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    t = torch.randint(0, 512, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(exported(t).logits, ours(t), rtol=0, atol=TOL)


def test_bf16_checkpoint_keeps_or_casts_dtype(tmp_path):
    ref = hf_model(CONFIGS["groups2-gqa-start-attn-end-attn"]).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "hf")
    kept = megatron_elastic.load_pretrained(tmp_path / "hf", dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    as_fp32 = megatron_elastic.load_pretrained(tmp_path / "hf")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    # bf16 weights widened to fp32 give the fp32 reference on those same weights
    ref32 = ref.float().eval()
    t = tokens_for(37)
    with torch.no_grad():
        torch.testing.assert_close(as_fp32(t), ref32(t).logits, rtol=0, atol=TOL)
