"""The nested-distillation step (distill/nested.py) and the budget selection (elastic/selection.py):
one step of the single-process elastic trainer equals KD + CE + router loss written out by hand on the
same masks; the metric keys are the fixed set; a budget's resolved choice honours the budget; an
unreachable budget fails with one line."""

import copy
from pathlib import Path

import pytest
import torch
from helpers import BatchData, BatchLoader

from megatron_elastic.config import load_config
from megatron_elastic.convert import save_native
from megatron_elastic.distill.losses import cross_entropy, forward_kl
from megatron_elastic.distill.nested import metric_keys
from megatron_elastic.elastic.costs import Cost, one_hot, router_loss
from megatron_elastic.elastic.router import Router
from megatron_elastic.elastic.search_space import ElasticSpace
from megatron_elastic.elastic.selection import BudgetSelection, check_budgets_reachable
from megatron_elastic.errors import ConfigError
from megatron_elastic.model import HybridLM, preset
from megatron_elastic.tracking import MultiTracker
from megatron_elastic.training.elastic_trainer import ElasticTrainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEQ, MICRO, ACCUM = 16, 2, 2


def _batches(vocab: int, n: int):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (MICRO, SEQ + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


class _RecordingTrainer(ElasticTrainer):
    """Keeps the gradients the step accumulated (before clipping) for the comparison."""

    def clip_gradients(self, params) -> float:
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.router_grads = [p.grad.clone() for p in self.router.parameters()]
        return super().clip_gradients(params)


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parent") / "parent"
    save_native(HybridLM(preset("tiny")), path)
    return path


def _cfg(run_dir, parent_dir, *overrides):
    return load_config(CONFIGS / "elastic-tiny.yaml", [
        f"run_dir={run_dir}", f"elastic.parent={parent_dir}", "train.device=cpu", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={MICRO * ACCUM}", "train.max_steps=4", "train.warmup_steps=1",
        "elastic.budgets=[1.0,0.6]", "distill.budgets_per_micro_batch=0", "distill.ce_weight=0.5",
        "elastic.router_warmup_steps=0", "distill.stage2_weights=[0.5,0.5]", *overrides,
    ])  # fmt: skip


def test_one_step_equals_the_hand_written_objective(tmp_path, parent_dir):
    cfg = _cfg(tmp_path, parent_dir)
    torch.manual_seed(0)
    parent = HybridLM(cfg.model)
    data = BatchData(BatchLoader(_batches(cfg.model.vocab_size, ACCUM)))
    trainer = _RecordingTrainer(cfg, data, depth_order=None, parent=parent, tracker=MultiTracker([]))
    model, router = copy.deepcopy(trainer.model), copy.deepcopy(trainer.router)
    teacher = copy.deepcopy(trainer.teacher)
    e, d, seed = cfg.elastic, cfg.distill, cfg.train.seed
    tau, scale = trainer.nested.schedules(0)

    metrics = trainer.step_metrics()

    space = ElasticSpace.from_config(cfg.model, e)
    cost = Cost(space, e.cost)
    ref = {k: [] for k in ("loss", "kd_loss/b1.00", "ce/b1.00", "kd_loss/b0.60", "ce/b0.60", "router_loss/b0.60",
                           "cost/b0.60")}  # fmt: skip
    for micro, (tokens, labels) in enumerate(data.train_loader.batches):
        with torch.no_grad():
            t_logits = teacher(tokens)
        for b_idx, budget in enumerate(e.budgets):
            tag = f"b{budget:.2f}"
            if budget == 1.0:
                state, rl = None, torch.zeros(())
            else:
                g = torch.Generator().manual_seed((seed * 1_000_003 + 0 * 1009 + micro * 31 + b_idx) % (2**63))
                sample = router.sample(b_idx, tau=tau, scale=scale, mode=e.mask_mode, generator=g)
                state, c = sample.state, cost(sample.probs)
                rl = router_loss(c, budget, cost.full, tolerance=e.router_tolerance)
                ref[f"router_loss/{tag}"].append(rl.detach())
                ref[f"cost/{tag}"].append((c / cost.full).detach())
            logits = model(tokens, elastic=state)
            kd = forward_kl(logits, t_logits, temperature=d.temperature)
            ce = cross_entropy(logits, labels)
            loss = d.kd_weight * kd + d.ce_weight * ce + e.router_loss_weight * rl
            (loss / (ACCUM * len(e.budgets))).backward()
            ref["loss"].append(loss.detach())
            ref[f"kd_loss/{tag}"].append(kd.detach())
            ref[f"ce/{tag}"].append(ce.detach())

    for key, values in ref.items():
        torch.testing.assert_close(torch.tensor(metrics[key]), torch.stack(values).double().mean().float(), rtol=1e-6,
                                   atol=1e-7, msg=key)  # fmt: skip
    for name, p in model.named_parameters():
        torch.testing.assert_close(trainer.grads[name], p.grad, rtol=1e-6, atol=1e-8, msg=name)
    for got, p in zip(trainer.router_grads, router.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-8)

    assert metrics["cost/b1.00"] == 1.0 and metrics["router_loss/b1.00"] == 0.0  # the parent: never routed
    assert set(metric_keys(e.budgets)) == {"loss"} | {f"{m}/{t}" for t in ("b1.00", "b0.60")
                                                      for m in ("kd_loss", "ce", "cost", "router_loss")}  # fmt: skip
    assert {"loss", "lr", "grad_norm", "tau", "scale"} <= set(metrics)
    assert {k for k in metrics if "/" in k and not k.startswith(("router/", "arch/"))} == set(metric_keys(e.budgets)) - {"loss"}
    assert trainer.teacher_forwards == ACCUM and trainer.step == 1


def _selection(budgets, tolerance=0.05):
    space = ElasticSpace(preset("tiny"), hidden=[1.0, 0.75, 0.5], ffn=[1.0, 0.75, 0.5, 0.25], mamba_heads=[1.0, 0.5])
    torch.manual_seed(0)
    router = Router(space, budgets)
    return BudgetSelection(space, router, Cost(space, "params"), budgets, tolerance=tolerance)


def test_choice_for_honours_the_budget(tmp_path, parent_dir):
    budgets = [1.0, 0.7, 0.5]
    sel = _selection(budgets)
    assert sel.is_full(0) and not sel.is_full(1)
    assert sel.argmax_cost_fraction(0) == 1.0
    for i, b in enumerate(budgets[1:], start=1):
        choice = sel.choice_for(i)
        fraction = float(sel.cost(one_hot(sel.space, choice))) / sel.cost.full
        assert abs(fraction / b - 1) <= sel.tolerance, (b, fraction)
        assert sel.argmax_cost_fraction(i) == pytest.approx(fraction)
        assert sel.architecture_for(i) == sel.space.architecture(choice)
    meta = sel.metadata(_cfg(tmp_path, parent_dir).elastic)
    assert list(meta["achieved_cost_fraction"].values())[0] == 1.0


def test_unreachable_budget_is_one_line():
    sel = _selection([1.0, 0.05])
    with pytest.raises(ConfigError) as info:
        sel.check_reachable()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("elastic.budgets: 0.05 is out of reach") and "(params)" in msg
    check_budgets_reachable(sel.space, sel.cost, [1.0, 0.7], tolerance=0.05)  # reachable: no error
