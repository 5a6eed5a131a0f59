"""Pipeline parallelism: the layer list cut into stages, run by megatron-core's 1F1B schedule.

Stage split: the ``|`` separators of the layer pattern when present (their count must match
``parallel.pp``), otherwise contiguous stages balanced by parameter count (the embedding counts on
the first stage, the final norm and output layer on the last).

A :class:`PipelineStage` holds *the same modules* as the single-device :class:`HybridLM` it was cut
from, under the same names (``embedding``, ``layers.<global index>``, ``final_norm``,
``output_layer``), so state-dict keys do not depend on the layout. Elastic masks stay in the global
index space: stage layer ``i`` reads ``elastic.layer(i)`` with its global index, and a layer whose
depth mask is 0 is skipped inside its stage.

Activations cross stage boundaries as ``(L, b, D)`` (megatron's ``[s, b, h]`` order, which its
schedule allocates receive buffers for).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import HybridConfig, num_parameters
from megatron_elastic.model.elastic_state import ElasticState


def stage_layer_ranges(config: HybridConfig, pp: int) -> list[range]:
    """Global layer indices of each of the ``pp`` stages."""
    n = config.num_layers
    if pp < 1 or pp > n:
        raise ConfigError(f"parallel.pp={pp} is invalid for {n} layers; use 1 <= pp <= {n}")
    written = config.stage_layer_counts
    if len(written) > 1:
        if len(written) != pp:
            raise ConfigError(f"model.pattern {config.pattern!r} has {len(written)} stages ('|') but parallel.pp={pp}; "
                              f"set parallel.pp={len(written)} or change the '|' separators")  # fmt: skip
        counts = written
    else:
        counts = balanced_counts(layer_costs(config), pp)
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def layer_costs(config: HybridConfig) -> list[float]:
    """Per-layer cost used to balance stages: parameters, with the embedding folded into the first
    layer and the final norm / output layer into the last."""
    counts = num_parameters(config)
    costs = [float(counts[f"layer{i}"]) for i in range(config.num_layers)]
    costs[0] += counts["embedding"]
    costs[-1] += counts["final_norm"] + counts["output_layer"]
    return costs


def balanced_counts(costs: list[float], parts: int) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` non-empty pieces minimising the largest piece
    (exact dynamic programme; ties keep earlier stages smaller)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-cost of splitting the first i layers into k stages
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    counts, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


class PipelineStage(nn.Module):
    """One pipeline stage of a :class:`HybridLM` (modules shared with it, names kept)."""

    def __init__(self, model: nn.Module, layers: range, *, first: bool, last: bool, mcore_config=None):
        super().__init__()
        if model.config.tie_embeddings and not (first and last):
            raise ConfigError("model.tie_embeddings=true with parallel.pp > 1 is not supported; untie the "
                              "embeddings or use parallel.pp=1")  # fmt: skip
        self.model_config = model.config
        # megatron's schedule reads `.config` (a ModelParallelConfig) from the module it runs.
        self.config = mcore_config
        self.first, self.last = first, last
        self.layer_range = layers
        self.model_type = _encoder_or_decoder()
        self.embedding = model.embedding if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.final_norm = model.final_norm if last else None
        self.output_layer = model.output_layer if last else None
        # The output head (a vocabulary-parallel one under TP) takes the output weight explicitly.
        self.head = model.head if last else None
        if last and first is False and self.output_layer is None:
            raise ConfigError("a last pipeline stage needs an output layer; untie the embeddings")
        self._input: torch.Tensor | None = None

    def set_input_tensor(self, tensors) -> None:
        """Called by megatron's schedule with the activation received from the previous stage."""
        self._input = tensors[0] if isinstance(tensors, (list, tuple)) else tensors

    def forward(self, tokens: torch.Tensor | None, elastic: ElasticState | None = None) -> torch.Tensor:
        """First stage: tokens (b, L) -> hidden; others: the received hidden. Returns (L, b, D)
        hidden, or (b, L, V[/tp]) float logits on the last stage."""
        hidden_mask = None if elastic is None else elastic.hidden
        if self.first:
            hidden = self.embedding(tokens)  # (b, L, D)
            if hidden_mask is not None:
                hidden = hidden * hidden_mask.to(hidden.dtype)
        else:
            assert self._input is not None, "no input tensor received from the previous stage"
            hidden = self._input.transpose(0, 1)  # (L, b, D) -> (b, L, D)
        for key, layer in self.layers.items():
            hidden = layer(hidden, hidden_mask, None if elastic is None else elastic.layer(int(key)))
        if not self.last:
            return hidden.transpose(0, 1).contiguous()  # (L, b, D) for the p2p send
        hidden = self.final_norm(hidden, hidden_mask)
        return output_logits(self, hidden)


class _ZeroGradient(torch.autograd.Function):
    """``value`` (default: a new zero scalar) as a function of ``anchor`` whose gradient is zero.

    A forward-only item inside a training schedule (the teacher's) still gets a backward pass, and
    the previous stage waits for the gradient of the activation it sent: this gives it zeros. The
    value is returned as is (an alias, no copy)."""

    @staticmethod
    def forward(ctx, anchor, value=None):
        ctx.like = (anchor.shape, anchor.dtype, anchor.device)
        return anchor.new_zeros(()) if value is None else value

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.like
        return torch.zeros(shape, dtype=dtype, device=device), None


def frozen_forward(stage: PipelineStage, frozen: PipelineStage, tokens: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """One schedule item of ``stage``'s training schedule that runs ``frozen`` instead (a no-grad model
    split like ``stage``, e.g. the distillation teacher) on what the schedule delivered to ``stage``.
    Returns (output, zero_loss): the output to send on (logits on the last stage, without a graph),
    and on the last stage ``zero_loss()``, the item's loss for the schedule (zero, with a zero
    gradient for the received activation)."""
    received = stage._input
    frozen.set_input_tensor(received)
    with torch.no_grad():
        out = frozen(tokens)
    frozen.set_input_tensor(None)  # the schedule keeps the received tensor only as long as it needs it
    if received is None:  # the first stage: its backward pass sends nothing
        return out, lambda: torch.zeros((), device=out.device)
    return (out if stage.last else _ZeroGradient.apply(received, out)), lambda: _ZeroGradient.apply(received)


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def output_logits(stage: PipelineStage, hidden: torch.Tensor) -> torch.Tensor:
    """(b, L, V) float logits (vocabulary-sharded (b, L, V/tp) under tensor parallelism)."""
    weight = stage.output_layer.weight if stage.output_layer is not None else stage.embedding.weight
    return stage.head(hidden, weight)


def build_stage(model: nn.Module, pp_size: int, pp_rank: int, *, mcore_config=None) -> PipelineStage:
    ranges = stage_layer_ranges(model.config, pp_size)
    return PipelineStage(model, ranges[pp_rank], first=pp_rank == 0, last=pp_rank == pp_size - 1,
                         mcore_config=mcore_config)  # fmt: skip


def mcore_pipeline_config(*, hidden_size: int, tp: int, pp: int, dtype=torch.float32, sequence_parallel=False):
    """The TransformerConfig megatron's schedule and p2p communicator read (only its parallel,
    communication and hidden-size fields matter: our layers do not read it)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=pp, hidden_size=hidden_size, num_attention_heads=tp,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=dtype,
                             sequence_parallel=sequence_parallel, batch_p2p_comm=False, batch_p2p_sync=False,
                             deallocate_pipeline_outputs=False, variable_seq_lengths=False,
                             use_cpu_initialization=True)  # fmt: skip


@dataclass
class PipelineRunner:
    """Runs megatron-core's non-interleaved 1F1B schedule over one stage with explicit groups."""

    stage: PipelineStage
    groups: object  # ParallelGroups

    def __post_init__(self):
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        from megatron.core.process_groups_config import ProcessGroupCollection

        g = self.groups
        pgc = ProcessGroupCollection()
        pgc.tp, pgc.pp, pgc.embd, pgc.pos_embd = g.tp, g.pp, g.embedding, None
        pgc.cp = _single_group(g)
        pgc.dp_cp = g.dp
        self.pg_collection = pgc
        self.p2p = P2PCommunicator(pp_group=g.pp, config=self.stage.config)

    def run(self, forward_step: Callable, items: list, *, seq_length: int, micro_batch_size: int,
            forward_only: bool = False) -> list:  # fmt: skip
        """``forward_step(item, stage) -> (output, loss_func)`` for each item (one schedule
        micro-batch); returns megatron's forward data store (last stage only)."""
        from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving

        it: Iterator = iter(items)

        def step_func(data_iterator, model):
            return forward_step(next(data_iterator), model)

        return forward_backward_pipelining_without_interleaving(
            forward_step_func=step_func, data_iterator=it, model=self.stage, num_microbatches=len(items),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only,
            p2p_communicator=self.p2p, pg_collection=self.pg_collection,
        )  # fmt: skip


def _single_group(groups):
    """A group of size one for megatron's context-parallel slot (we use no context parallelism)."""
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group()
