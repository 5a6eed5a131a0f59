"""Model config parsing and validation: every user error names the problem and the fix."""

import dataclasses

import pytest

from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, num_parameters, parse_pattern, preset

BASE = dict(
    pattern="M-*", vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
    head_dim=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=8,
)  # fmt: skip


def make(**kw):
    return HybridConfig(**(BASE | kw))


def test_pattern_with_stages():
    layers, stages = parse_pattern("M-M*|M-|-")
    assert layers == ["M", "-", "M", "*", "M", "-", "-"]
    assert stages == [4, 2, 1]
    cfg = make(pattern="M-|*M")
    assert cfg.num_layers == 4 and cfg.stage_layer_counts == [2, 2] and cfg.layer_types == ["M", "-", "*", "M"]


@pytest.mark.parametrize(
    "pattern,needle",
    [
        ("", "is empty"),
        ("M-X*", "unknown symbol 'X' at position 2"),
        ("M-E-", "model.num_moe_experts=0 is invalid; the pattern has MoE ('E') layers, so it must be a positive"),
        ("|M-", "empty pipeline stage at position 0"),
        ("M-||*", "empty pipeline stage at position 3"),
        ("M-*|", "ends with '|'"),
    ],
)
def test_malformed_pattern(pattern, needle):
    with pytest.raises(ConfigError) as err:
        make(pattern=pattern)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_mamba_heads_not_divisible_by_groups():
    with pytest.raises(ConfigError, match=r"mamba_num_heads=6 is not divisible by model.mamba_num_groups=4"):
        make(mamba_num_heads=6, mamba_num_groups=4)


def test_query_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match=r"num_attention_heads=6 is not divisible by model.num_query_groups=4"):
        make(num_attention_heads=6, num_query_groups=4)


@pytest.mark.parametrize("field,value", [("hidden_size", 0), ("vocab_size", -3), ("head_dim", 2.5), ("mamba_state_dim", True)])
def test_positive_integers(field, value):
    with pytest.raises(ConfigError, match=rf"model.{field}={value!r} is invalid; it must be a positive integer"):
        make(**{field: value})


def test_dt_ranges():
    with pytest.raises(ConfigError, match="exceeds model.mamba_dt_max"):
        make(mamba_dt_min=0.5, mamba_dt_max=0.1)
    with pytest.raises(ConfigError, match="mamba_dt_limit"):
        make(mamba_dt_limit=(0.5, 0.1))
    assert make(mamba_dt_limit=[0.0, float("inf")]).mamba_dt_limit == (0.0, float("inf"))


def test_from_dict_suggests_nearest_key():
    data = make().to_dict()
    data["hiden_size"] = data.pop("hidden_size")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        HybridConfig.from_dict(data)
    data = make().to_dict()
    del data["vocab_size"]
    with pytest.raises(ConfigError, match="missing required key"):
        HybridConfig.from_dict(data)


def test_dict_round_trip():
    cfg = make(tie_embeddings=True, mlp_bias=True)
    assert HybridConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": True}, {"mlp_bias": True, "mamba_proj_bias": True, "mamba_conv_bias": False},
     {"pattern": "*-M|M-*|-"}],
)  # fmt: skip
def test_analytic_parameter_count_equals_numel(overrides):
    cfg = make(**overrides)
    model = HybridLM(cfg)
    counts = num_parameters(cfg)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    for i, layer in enumerate(model.layers):
        assert counts[f"layer{i}"] == sum(p.numel() for p in layer.parameters())


def test_presets():
    tiny = preset("tiny")
    assert sum(num_parameters(tiny).values()) == HybridLM(tiny).num_parameters()
    big = preset("nemotron-nano-12b-v2")
    kinds = big.layer_types
    assert (len(kinds), kinds.count("M"), kinds.count("*"), kinds.count("-")) == (62, 28, 6, 28)
    assert (big.hidden_size, big.ffn_hidden_size, big.mamba_num_heads, big.mamba_head_dim) == (5120, 20480, 128, 80)
    # "12B": the analytic count of the real shapes
    assert 12.2e9 < sum(num_parameters(big).values()) < 12.4e9
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        preset("huge")


def test_config_fields_are_keyword_only():
    fields = [f for f in dataclasses.fields(HybridConfig) if f.init]
    assert all(f.kw_only for f in fields)
    with pytest.raises(TypeError):
        HybridConfig("M", 1)  # type: ignore[misc]
