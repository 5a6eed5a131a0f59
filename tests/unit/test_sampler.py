"""The budget curriculum: draws depend only on (seed, step, micro-batch) and the stage; weights,
the full-model probability, the stage switch; one-line errors."""

import collections

import pytest

from megatron_elastic.elastic.sampler import BudgetSampler, check_budgets
from megatron_elastic.errors import ConfigError

BUDGETS = [1.0, 0.75, 0.5]


def test_draws_depend_only_on_seed_step_and_micro_batch():
    a = BudgetSampler(BUDGETS, seed=3, budgets_per_micro_batch=2)
    b = BudgetSampler(BUDGETS, seed=3, budgets_per_micro_batch=2)
    keys = [(step, mb) for step in range(40) for mb in range(4)]
    forward = [a.sample(step, mb) for step, mb in keys]
    backward = [b.sample(step, mb) for step, mb in reversed(keys)][::-1]  # another order, another instance
    assert forward == backward and all(len(d) == 2 for d in forward)
    assert len({tuple(d) for d in forward}) > 3
    other = BudgetSampler(BUDGETS, seed=4, budgets_per_micro_batch=2)
    assert [other.sample(step, mb) for step, mb in keys] != forward
    assert a.sample(5, 0) != a.sample(5, 1) or a.sample(6, 0) != a.sample(6, 1)


def test_stage_switch_by_step_or_tokens():
    s = BudgetSampler(BUDGETS, switch_step=100, switch_tokens=10_000)
    assert s.stage(99, 9_999) == 1 and s.stage(100, 0) == 2 and s.stage(5, 10_000) == 2
    assert BudgetSampler(BUDGETS).stage(10**9, 10**12) == 1
    s = BudgetSampler(BUDGETS, stage2_weights=[1, 0, 0], switch_step=10, seed=1)
    assert {i for step in range(10, 60) for i in s.sample(step, 0)} == {0}
    assert {i for step in range(10) for i in s.sample(step, 0)} > {0}
    # The stage enters the draw: same (seed, step, micro-batch), different stage -> stage-2 weights.
    s = BudgetSampler(BUDGETS, stage2_weights=[1, 0, 0], switch_tokens=500, seed=1)
    assert s.sample(3, 0, tokens_seen=500) == [0]


def frequencies(sampler, n=3000, **kw):
    counts = collections.Counter(i for step in range(n) for i in sampler.sample(step, 0, **kw))
    total = sum(counts.values())
    return [counts[i] / total for i in range(len(sampler.budgets))]


def test_weights_and_full_model_probability():
    uniform = frequencies(BudgetSampler(BUDGETS, seed=0))
    assert all(abs(f - 1 / 3) < 0.03 for f in uniform)
    paper = BudgetSampler(BUDGETS, stage2_weights=[0.5, 0.3, 0.2], switch_step=0, seed=0)
    assert all(abs(f - w) < 0.03 for f, w in zip(frequencies(paper), [0.5, 0.3, 0.2]))
    s = BudgetSampler(BUDGETS, stage1_weights=[0, 0, 2], full_model_prob=0.25, seed=0)
    f = frequencies(s)
    assert f[1] == 0 and abs(f[0] - 0.25) < 0.03 and abs(f[2] - 0.75) < 0.03
    assert frequencies(BudgetSampler(BUDGETS, full_model_prob=1.0), n=200) == [1.0, 0.0, 0.0]
    # full_model_prob draws its own number: the weighted picks of the other draws do not move.
    base, with_full = BudgetSampler(BUDGETS, seed=9), BudgetSampler(BUDGETS, seed=9, full_model_prob=0.3)
    pairs = [(base.sample(t, 0)[0], with_full.sample(t, 0)[0]) for t in range(300)]
    assert all(b == w for b, w in pairs if w != 0)


def test_sandwich_trains_every_budget():
    assert BudgetSampler(BUDGETS, budgets_per_micro_batch=0).sample(7, 2) == [0, 1, 2]


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(budgets=[1.0, 1.5]), "elastic.budgets contains 1.5; every budget must be a fraction in (0, 1]"),
        (dict(budgets=[1.0, 0.0]), "elastic.budgets contains 0.0"),
        (dict(budgets=[1.0, 0.5, 0.75]), "must be unique and sorted largest first"),
        (dict(budgets=[1.0, 0.5, 0.5]), "must be unique and sorted largest first"),
        (dict(budgets=[0.75, 0.5]), "must start with 1.0 (the full model)"),
        (dict(budgets=[]), "give fractions of the parent"),
        (dict(stage1_weights=[1, 1]), "distill.stage1_weights has 2 entries for 3 budgets"),
        (dict(stage2_weights=[1, -1, 1], switch_step=1), "distill.stage2_weights=[1, -1, 1] is invalid; give non-neg"),
        (dict(stage1_weights=[0, 0, 0]), "with a positive sum"),
        (dict(full_model_prob=1.5), "distill.full_model_prob=1.5 is not a probability"),
        (dict(switch_step=-1), "distill.stage2_start_step=-1 is invalid"),
        (dict(budgets_per_micro_batch=-2), "distill.budgets_per_micro_batch=-2 is invalid"),
    ],
)
def test_errors_name_the_fix(kw, needle):
    kw = {"budgets": BUDGETS} | kw
    with pytest.raises(ConfigError) as err:
        BudgetSampler(kw.pop("budgets"), **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_stage2_weights_without_a_switch_warns():
    with pytest.warns(UserWarning, match="stage2_weights is ignored"):
        BudgetSampler(BUDGETS, stage2_weights=[1, 1, 1])


def test_check_budgets_returns_floats():
    assert check_budgets([1, 0.5]) == [1.0, 0.5]
