"""Permuting a parent by a ranking changes nothing it computes, moves every coupled tensor the same
way, and leaves every prefix submodel a valid slice (masked == sliced) holding the top indices."""

import pytest
import torch
from reference import randomize_

from megatron_elastic.elastic import extract, hard_state, homogeneous
from megatron_elastic.elastic.importance import Ranking, compute_ranking
from megatron_elastic.elastic.permute import permute_
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridConfig, HybridLM, preset

# Several groups on both head axes, GQA, biases everywhere, tied embeddings, head_dim != hidden/heads.
GROUPED = dict(
    pattern="M*-M-*M", vocab_size=97, hidden_size=48, ffn_hidden_size=40, num_attention_heads=6,
    num_query_groups=3, head_dim=8, mamba_num_heads=6, mamba_head_dim=5, mamba_num_groups=3,
    mamba_state_dim=4, mamba_chunk_size=8, mlp_bias=True, mamba_proj_bias=True, tie_embeddings=True,
)  # fmt: skip
HETERO = GROUPED | dict(tie_embeddings=False, ffn_hidden_size_per_layer=[40, 24], num_attention_heads_per_layer=[6, 3],
                        mamba_num_heads_per_layer=[6, 3, 9], mamba_head_dim_per_layer=[5, 5, 3])  # fmt: skip
CONFIGS = {"tiny": lambda: preset("tiny"), "grouped": lambda: HybridConfig(**GROUPED),
           "heterogeneous": lambda: HybridConfig(**HETERO)}  # fmt: skip
# Logits are O(5). The model computes norms, the scan and the logits in fp32, and a permutation
# reorders fp32 reductions: measured max |diff| ~1.6e-5 on these models (bugs give O(1)).
LOGIT_TOL = 1e-4
# Masked and sliced runs reduce over different shapes (as in test_slicing).
SLICE_TOL = 2e-4


def make(name: str, seed: int = 1) -> HybridLM:
    torch.manual_seed(seed)
    return randomize_(HybridLM(CONFIGS[name]()), seed=seed).eval()


def tokens_for(config, batch=2, length=24, seed=0):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_ranking(config: HybridConfig, seed: int) -> Ranking:
    """Every axis shuffled (heads only inside their groups): every index moves."""
    g = torch.Generator().manual_seed(seed)

    def perm(n, groups=1):
        per = n // groups
        return torch.cat([torch.randperm(per, generator=g) + k * per for k in range(groups)]).tolist()

    r = Ranking.identity(config)
    r.hidden = perm(config.hidden_size)
    r.ffn = {i: perm(len(o)) for i, o in r.ffn.items()}
    r.attn_heads = {i: perm(len(o), config.num_query_groups) for i, o in r.attn_heads.items()}
    r.mamba_heads = {i: perm(len(o), config.mamba_num_groups) for i, o in r.mamba_heads.items()}
    r.mamba_head_dim = {i: perm(len(o)) for i, o in r.mamba_head_dim.items()}
    return r


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["random", "computed"])
def test_permutation_keeps_logits(name, kind):
    model = make(name)
    tokens = tokens_for(model.config)
    if kind == "random":
        ranking = random_ranking(model.config, seed=7)
    else:
        ranking = compute_ranking(model, [tokens_for(model.config, seed=s) for s in (1, 2)], depth_method="random")
    params = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(tokens)
        permute_(model, ranking)
        after = model(tokens)
    assert before.abs().max() > 1.0
    torch.testing.assert_close(after, before, rtol=0, atol=LOGIT_TOL)
    # in place: the same Parameter objects (optimizers, tied weights keep working)
    assert all(p is params[n] for n, p in model.named_parameters())
    if model.config.tie_embeddings:
        assert model.output_weight() is model.embedding.weight


def test_identity_ranking_is_a_no_op():
    model = make("grouped")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    permute_(model, Ranking.identity(model.config))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_every_coupled_tensor_moves_with_its_axis():
    model = make("grouped")
    cfg = model.config
    old = {k: v.clone() for k, v in model.state_dict().items()}
    r = random_ranking(cfg, seed=3)
    permute_(model, r)
    new = model.state_dict()
    h = torch.tensor(r.hidden)
    assert torch.equal(new["embedding.weight"], old["embedding.weight"][:, h])
    assert torch.equal(new["final_norm.weight"], old["final_norm.weight"][h])
    f = torch.tensor(r.ffn[2])
    assert torch.equal(new["layers.2.mixer.up_proj.weight"], old["layers.2.mixer.up_proj.weight"][f][:, h])
    assert torch.equal(new["layers.2.mixer.up_proj.bias"], old["layers.2.mixer.up_proj.bias"][f])
    assert torch.equal(new["layers.2.mixer.down_proj.weight"], old["layers.2.mixer.down_proj.weight"][h][:, f])
    assert torch.equal(new["layers.2.mixer.down_proj.bias"], old["layers.2.mixer.down_proj.bias"][h])
    a = r.attn_heads[1]
    hd = cfg.head_dim
    for pos, head in enumerate(a):
        q_new = new["layers.1.mixer.q_proj.weight"][pos * hd : (pos + 1) * hd]
        assert torch.equal(q_new, old["layers.1.mixer.q_proj.weight"][head * hd : (head + 1) * hd][:, h])
    assert torch.equal(new["layers.1.mixer.k_proj.weight"], old["layers.1.mixer.k_proj.weight"][:, h])
    mh, mc = r.mamba_heads[0], r.mamba_head_dim[0]
    P, di = cfg.mamba_head_dim, cfg.mamba_d_inner
    gn = cfg.mamba_num_groups * cfg.mamba_state_dim
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(new[f"layers.0.mixer.{name}"], old[f"layers.0.mixer.{name}"][mh])
    w_old, w_new = old["layers.0.mixer.in_proj.weight"][:, h], new["layers.0.mixer.in_proj.weight"]
    for pos, head in enumerate(mh):
        for c, chan in enumerate(mc):
            for part in (0, di):  # z, x
                assert torch.equal(w_new[part + pos * P + c], w_old[part + head * P + chan])
            assert torch.equal(
                new["layers.0.mixer.conv1d.weight"][pos * P + c], old["layers.0.mixer.conv1d.weight"][head * P + chan]
            )
            assert new["layers.0.mixer.norm.weight"][pos * P + c] == old["layers.0.mixer.norm.weight"][head * P + chan]
        assert torch.equal(w_new[2 * di + 2 * gn + pos], w_old[2 * di + 2 * gn + head])  # dt
    assert torch.equal(w_new[2 * di : 2 * di + 2 * gn], w_old[2 * di : 2 * di + 2 * gn])  # B, C untouched
    assert torch.equal(new["layers.0.mixer.conv1d.weight"][di:], old["layers.0.mixer.conv1d.weight"][di:])


def test_masked_equals_sliced_after_permutation_and_keeps_the_top():
    model = make("grouped")
    cfg = model.config
    calib = [tokens_for(cfg, seed=s) for s in (1, 2)]
    ranking = compute_ranking(model, calib, depth_method="block-influence")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    permute_(model, ranking)
    tokens = tokens_for(cfg, length=29)
    drop = tuple(ranking.layers_to_drop(2))
    for kw in (dict(hidden=24), dict(ffn=16), dict(attn_heads=3), dict(mamba_heads=3), dict(mamba_head_dim=2),
               dict(drop_layers=drop), dict(hidden=32, ffn=24, attn_heads=3, mamba_heads=3, mamba_head_dim=3,
                                            drop_layers=drop[:1])):  # fmt: skip
        arch = homogeneous(cfg, **kw)
        child = extract(model, arch)
        with torch.no_grad():
            masked = model(tokens, elastic=hard_state(cfg, arch))
            sliced = child(tokens)
        torch.testing.assert_close(sliced, masked, rtol=0, atol=SLICE_TOL)
    # the 16-neuron child of layer 2 holds the 16 most important neurons of the original parent
    child = extract(model, homogeneous(cfg, hidden=24, ffn=16))
    top_f, top_h = torch.tensor(ranking.ffn[2][:16]), torch.tensor(ranking.hidden[:24])
    assert torch.equal(child.state_dict()["layers.2.mixer.up_proj.weight"],
                       original["layers.2.mixer.up_proj.weight"][top_f][:, top_h])  # fmt: skip


def test_ranking_that_does_not_fit_is_rejected():
    model = make("grouped")
    cfg = model.config
    r = Ranking.identity(cfg)
    r.attn_heads[1] = [2, 1, 0, 3, 4, 5]  # head 2 (KV group 1) moved into group 0
    with pytest.raises(ConfigError, match="only be reordered inside their group"):
        permute_(model, r)
    r = Ranking.identity(cfg)
    r.mamba_heads[0] = [0, 1, 2, 3, 5, 4][::-1]
    with pytest.raises(ConfigError, match="inside their group"):
        permute_(model, r)
    r = Ranking.identity(cfg)
    r.hidden = r.hidden[:-1]
    with pytest.raises(ConfigError, match="not a permutation"):
        permute_(model, r)
    with pytest.raises(ConfigError, match="computed for another model"):
        permute_(make("tiny"), Ranking.identity(cfg))
