"""Tensor-parallel layouts without processes: divisibility errors, the component map, and the
merge / split round trip of state dicts (and of optimizer-state-shaped tensors)."""

import pytest
import torch
from reference import randomize_

from megatron_elastic.elastic import ElasticSpace
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, preset
from megatron_elastic.model.layout import component_layout
from megatron_elastic.parallel.tensor import (
    check_tp_divisibility,
    merge_tp_state_dicts,
    split_tp_state_dict,
    tp_component_slices,
)  # fmt: skip

CFG = dict(
    pattern="M*-M-*M", vocab_size=96, hidden_size=48, ffn_hidden_size=64, num_attention_heads=8,
    num_query_groups=4, head_dim=10, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=4,
    mamba_state_dim=4, mamba_chunk_size=8, mlp_bias=True, mamba_proj_bias=True,
)  # fmt: skip


def _config(**kw) -> HybridConfig:
    return HybridConfig(**(CFG | kw))


def test_divisible_configs_pass():
    for tp in (1, 2, 4):
        check_tp_divisibility(_config(), tp)
    check_tp_divisibility(preset("nemotron-nano-12b-v2"), 8)


@pytest.mark.parametrize(
    "kw,tp,needle",
    [
        (dict(vocab_size=101), 2, "model.vocab_size=101 is not divisible by parallel.tp=2; pad the vocabulary to a multiple of 2 (e.g. 102)"),
        (dict(num_query_groups=2, num_attention_heads=6), 4, "model.num_query_groups=2 (KV heads) is not divisible by parallel.tp=4"),
        (dict(mamba_num_groups=2), 4, "model.mamba_num_groups=2 is not divisible by parallel.tp=4"),
        (dict(ffn_hidden_size=66), 4, "FFN size 66 is not divisible by parallel.tp=4"),
        (dict(ffn_hidden_size_per_layer=[64, 30]), 4, "layer 4: FFN size 30 is not divisible by parallel.tp=4"),
    ],
)  # fmt: skip
def test_divisibility_errors_are_one_line_naming_the_fix(kw, tp, needle):
    with pytest.raises(ConfigError) as err:
        check_tp_divisibility(_config(**kw), tp)
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg
    assert ";" in msg  # problem; fix


def test_elastic_choices_must_split_over_tp():
    config = _config()
    ok = ElasticSpace.from_sizes(config, {"ffn": [64, 48, 32], "attn_heads": [8, 4], "mamba_heads": [8, 4]})
    check_tp_divisibility(config, 4, ok)
    bad = ElasticSpace.from_sizes(config, {"ffn": [64, 48, 30]})
    with pytest.raises(ConfigError, match=r"^elastic.ffn size 30 is not divisible by parallel.tp=4; .*multiple of 4") as err:
        check_tp_divisibility(config, 4, bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="elastic.ffn size 6 is not divisible by parallel.tp=4"):
        check_tp_divisibility(config, 4, {"ffn": [64, 6]})
    # the run config's elastic section (fractions) is resolved to sizes as the elastic trainer does
    from megatron_elastic.config.schema import ElasticConfig

    check_tp_divisibility(config, 4, ElasticConfig(parent="p", ffn=[1.0, 0.75, 0.5]))  # 64, 48, 32
    with pytest.raises(ConfigError, match="elastic.ffn size 38 is not divisible by parallel.tp=4"):
        check_tp_divisibility(config, 4, ElasticConfig(parent="p", ffn=[1.0, 0.6]))  # floor(0.6 * 64) = 38
    with pytest.raises(ConfigError, match="parallel.tp=0 is invalid"):
        check_tp_divisibility(config, 0)


def test_component_keys_are_layout_independent():
    config = _config()
    model = HybridLM(config)
    plain = tp_component_slices(model)
    assert set(plain) == {n for n, _ in model.named_parameters()}
    in_proj = plain["layers.0.mixer.in_proj.weight"]
    assert [c.key for c in in_proj] == [f"layers.0.mixer.in_proj.weight.{p}" for p in ("z", "x", "B", "C", "dt")]
    # global places of the packed components: [z, x, B, C, dt] = [48, 48, 16, 16, 8] rows
    assert [c.local_slice[0] for c in in_proj] == [slice(0, 48), slice(48, 96), slice(96, 112), slice(112, 128), slice(128, 136)]
    assert [c.key for c in plain["layers.0.mixer.conv1d.weight"]] == [f"layers.0.mixer.conv1d.weight.{p}" for p in ("x", "B", "C")]
    assert plain["layers.0.mixer.out_proj.weight"][0].shard_axis == 1
    assert plain["layers.0.mixer.out_proj.bias"][0].shard_axis is None
    assert plain["final_norm.weight"][0].shard_axis is None
    assert plain["embedding.weight"][0].shard_axis == 0
    for tp in (2, 4):
        for name, p in model.named_parameters():
            local = component_layout(config, name, p.dim(), tp)
            assert [c.key for c in local] == [c.key for c in plain[name]]
            assert [c.shard_axis for c in local] == [c.shard_axis for c in plain[name]]
    # at TP=4 rank pieces of in_proj are a quarter of each component, packed in the same order
    local = component_layout(config, "layers.0.mixer.in_proj.weight", 2, 4)
    assert [c.local_slice[0] for c in local] == [slice(0, 12), slice(12, 24), slice(24, 28), slice(28, 32), slice(32, 34)]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("tie", [False, True])
def test_split_merge_round_trip(tp, tie):
    config = _config(tie_embeddings=tie)
    full = randomize_(HybridLM(config), seed=4).state_dict()
    shards = [split_tp_state_dict(full, config, r, tp) for r in range(tp)]
    d_inner, gn, h = 48, 16, 8
    assert shards[0]["layers.0.mixer.in_proj.weight"].shape == ((2 * d_inner + 2 * gn + h) // tp, 48)
    assert shards[1]["layers.0.mixer.out_proj.weight"].shape == (48, d_inner // tp)
    torch.testing.assert_close(shards[1]["final_norm.weight"], full["final_norm.weight"], rtol=0, atol=0)
    # rank 1's z rows are z rows d_inner/tp .. 2 d_inner/tp of the parent, and its dt rows the same heads
    z = full["layers.0.mixer.in_proj.weight"][: d_inner]
    torch.testing.assert_close(shards[1]["layers.0.mixer.in_proj.weight"][: d_inner // tp], z.chunk(tp)[1], rtol=0, atol=0)
    dt = full["layers.0.mixer.in_proj.weight"][2 * d_inner + 2 * gn:]
    torch.testing.assert_close(shards[1]["layers.0.mixer.in_proj.weight"][-(h // tp):], dt.chunk(tp)[1], rtol=0, atol=0)
    merged = merge_tp_state_dicts(shards, config)
    assert set(merged) == set(full)
    for k in full:
        assert torch.equal(merged[k], full[k]), k
    # megatron-core layers add an empty ``_extra_state`` entry: merge skips it
    shards[0]["layers.0.mixer.in_proj._extra_state"] = None
    assert set(merge_tp_state_dicts(shards, config)) == set(full)


# ----------------------------------------------------------------------------- FP8 (config side; runs on CPU)


def test_fp8_keeps_first_and_last_layers_in_bf16():
    from megatron_elastic.config.schema import FP8Config

    assert [FP8Config(enabled=True).layer_in_fp8(i, 7) for i in range(7)] == [False] + [True] * 5 + [False]
    assert [FP8Config(enabled=True, bf16_layers=2).layer_in_fp8(i, 6) for i in range(6)] == [False, False, True, True, False, False]
    assert not any(FP8Config(enabled=False).layer_in_fp8(i, 7) for i in range(7))


def test_fp8_config_validation_and_parallel_keys():
    from megatron_elastic.config import load_config
    from megatron_elastic.config.schema import FP8Config

    cfg = load_config("tiny", ["parallel.fp8.enabled=true", "parallel.fp8.format=e4m3", "parallel.fp8.bf16_layers=2"]).parallel.fp8
    assert (cfg.enabled, cfg.format, cfg.bf16_layers, cfg.recipe) == (True, "e4m3", 2, "delayed")
    assert load_config("tiny", ["parallel.tp=2"]).parallel.fp8.enabled is False  # no fp8 keys: off
    for kw, needle in [(dict(format="e5m2"), "parallel.fp8.format='e5m2' is invalid; use hybrid or e4m3"),
                       (dict(recipe="mx"), "parallel.fp8.recipe='mx' is invalid"),
                       (dict(bf16_layers=-1), "parallel.fp8.bf16_layers=-1 is invalid"),
                       (dict(amax_history_len=0), "parallel.fp8.amax_history_len=0 is invalid")]:  # fmt: skip
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            FP8Config(**kw).validate()


def test_fp8_dimension_checks():
    from megatron_elastic.parallel.tensor import check_fp8_divisibility

    big = preset("nemotron-nano-12b-v2")
    check_fp8_divisibility(big, 8)
    space = ElasticSpace(big, hidden=[1.0, 0.875, 0.75], ffn=[1.0, 0.77, 0.5], attn_heads=[1.0, 0.5], multiple_of=128)
    check_fp8_divisibility(big, 8, space)
    with pytest.raises(ConfigError, match=r"^elastic.ffn size 20472 gives a per-rank FFN width of 2559 at parallel.tp=8, "
                                          r"not a multiple of 16 as FP8 GEMMs need; set elastic.multiple_of=128$"):  # fmt: skip
        check_fp8_divisibility(big, 8, {"ffn": [20480, 20472]})
    with pytest.raises(ConfigError, match=r"^elastic.ffn size 15760 gives a per-rank FFN width of 1970 at parallel.tp=8"):
        check_fp8_divisibility(big, 8, ElasticSpace(big, ffn=[1.0, 0.77], multiple_of=16))  # 1970 = 15760 / 8
    # 112 of 128 Mamba heads: d_inner / tp = 1120 is fine, but in_proj / tp = (2 * 8960 + 2 * 8 * 128 + 112) / 8 = 2510
    with pytest.raises(ConfigError, match=r"^elastic.mamba_heads size 112 with head dim 80 gives a per-rank Mamba in_proj "
                                          r"width of 2510 at parallel.tp=8, not a multiple of 16 as FP8 GEMMs need; "
                                          r"drop that elastic.mamba_heads choice or set parallel.fp8.enabled=false$"):  # fmt: skip
        check_fp8_divisibility(big, 8, ElasticSpace(big, mamba_heads=[1.0, 0.875], multiple_of=16))
    with pytest.raises(ConfigError, match=r"layer 0: Mamba in_proj width / tp = 648 is not a multiple of 16"):
        check_fp8_divisibility(preset("tiny"), 1)
    with pytest.raises(ConfigError, match=r"^model.hidden_size = 40 is not a multiple of 16 as FP8 GEMMs need; "):
        check_fp8_divisibility(_config(hidden_size=40), 1)
    with pytest.raises(ConfigError, match=r"^layer 0: Mamba d_inner / tp = 6 is not a multiple of 16"):
        check_fp8_divisibility(_config(), 8)


def test_transformer_engine_missing_is_a_one_line_config_error():
    from megatron_elastic.parallel.tensor import LINEAR_SPECS

    try:
        import transformer_engine.pytorch
    except Exception:
        pass
    else:
        pytest.skip("Transformer Engine is installed here; the GPU tests cover it")
    with pytest.raises(ConfigError, match=r"^parallel.fp8 needs Transformer Engine, which cannot be imported here .*set parallel.fp8.enabled=false$"):
        LINEAR_SPECS["transformer_engine"]()
    with pytest.raises(ConfigError, match=r"^parallel.fp8 needs Transformer Engine"):  # with sequence parallelism too
        LINEAR_SPECS["transformer_engine"](True)
