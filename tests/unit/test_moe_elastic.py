from megatron_elastic.model.config import active_parameters, moe_parameters, num_parameters, preset


def test_active_parameters_hand_count():
    c = preset("tiny-moe")
    d, f = c.hidden_size, c.moe_ffn_hidden_size
    unused_per_layer = (c.num_moe_experts - c.moe_router_topk) * 2 * c.moe_expert_input_size * f
    n_moe = c.layer_types.count("E")
    assert n_moe == 2 and unused_per_layer > 0 and d > 0
    assert active_parameters(c) == sum(num_parameters(c).values()) - n_moe * unused_per_layer
    assert moe_parameters(c)["active"] < moe_parameters(c)["total"]
