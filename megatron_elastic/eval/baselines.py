"""The alternatives a user would otherwise take, built for the same child architectures:

=============  ===================================================================================
method         how each budget's model is made
=============  ===================================================================================
one-shot       slice the importance-permuted parent to the child architecture; no training
               (``megatron-elastic prune``)
separate       slice as one-shot, then distil that one child from the frozen parent (forward KL on
               logits, as the nested run) with its own share of the tokens (Minitron-style)
depth-only     drop whole layers, least block influence first (ShortGPT), until the parameter
               count is within the budget; no width cuts, no training
scratch        the child architecture, randomly initialised and trained with cross-entropy on the
               same number of tokens as ``separate``
=============  ===================================================================================

:class:`SeparateDistillTrainer` is the nested trainer with one budget (the child itself, unmasked)
and the real parent as teacher; :class:`ContinueTrainer` is the plain trainer started from given
weights (the recall fine-tuning stage and the from-scratch runs use it).
"""

from __future__ import annotations

from megatron_elastic.elastic.space import homogeneous
from megatron_elastic.model.config import HybridConfig, num_parameters
from megatron_elastic.training.elastic_trainer import ElasticTrainer
from megatron_elastic.training.trainer import Trainer

METHODS = ("nested", "one-shot", "separate", "depth-only", "scratch")


class ContinueTrainer(Trainer):
    """The plain trainer (cross-entropy) on a model given from outside instead of a fresh one."""

    def __init__(self, cfg, data, *, model, **kw):
        self._given = model
        super().__init__(cfg, data, **kw)

    def build_model(self):
        return self._given


class SeparateDistillTrainer(ElasticTrainer):
    """Distil one standalone child from a teacher: the nested step with a single budget (1.0 = the
    child itself, never masked or routed), the teacher swapped for ``teacher``.

    ``cfg.elastic`` must describe the child alone: ``budgets=[1.0]``, every axis ``[1.0]``,
    ``router_warmup_steps=0`` (there is nothing to route).
    """

    def __init__(self, cfg, data, *, child, teacher, **kw):
        self._given_teacher = teacher
        super().__init__(cfg, data, depth_order=None, parent=child, **kw)
        if self.budgets != [1.0]:
            raise ValueError(f"separate distillation trains one child (budgets [1.0]); got {self.budgets}")

    def build_teacher(self):
        # The nested trainer's teacher is a copy of its student at step 0; here it is the real parent.
        return self._given_teacher.to(self.device)

    def on_finished(self) -> None:
        pass  # the run's last checkpoint is the child; no many-in-one directory for a single model


def depth_only_architecture(config: HybridConfig, influence: list[float], budget: float, *,
                            tolerance: float = 0.05, protect_attention: bool = False):  # fmt: skip
    """Drop layers in increasing block influence until the parameters are at most
    ``budget * (1 + tolerance)`` of the parent's (attention layers kept when protected).
    Returns (architecture, dropped layer indices)."""
    full = sum(num_parameters(config).values())
    order = sorted(range(config.num_layers), key=lambda i: (influence[i], i))
    if protect_attention:
        order = [i for i in order if config.layer_types[i] != "*"]
    dropped: list[int] = []
    arch = homogeneous(config)
    for i in order:
        if _params(config, arch) <= budget * full * (1 + tolerance) or len(dropped) == config.num_layers - 1:
            break
        dropped.append(i)
        arch = homogeneous(config, drop_layers=tuple(dropped))
    return arch, sorted(dropped)


def _params(config: HybridConfig, arch) -> int:
    from megatron_elastic.elastic.space import child_config

    return sum(num_parameters(child_config(config, arch)).values())
