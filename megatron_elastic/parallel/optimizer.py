"""Mixed precision and the distributed optimizer, as Megatron does them: megatron-core's
``DistributedDataParallel`` over the model and its ``Float16OptimizerWithFloat16Params`` or
``DistributedOptimizer`` over that.

* weights in ``train.params_dtype`` (bfloat16 or float32); the optimizer keeps fp32 main weights
  and fp32 Adam moments (megatron-core's main params), the DDP wrapper accumulates gradients in an
  fp32 buffer (``grad_reduce_in_fp32``: ``param.main_grad``) and averages them over the
  data-parallel group (all-reduce; reduce-scatter with the distributed optimizer, which then owns
  1/dp of the main weights and moments and all-gathers the updated weights after its step);
* the torch optimizer inside is the single-process trainer's AdamW (the same parameter groups: no
  weight decay on gains, biases and the SSM scalars; ``foreach=False``), handed to megatron-core's
  wrapper classes directly, as ``get_megatron_optimizer`` does after building its own groups;
* the elastic router stays outside: a small replicated torch AdamW (its gradients reduced by the
  trainer, its param group flagged ``is_router`` for the LR multiplier, not clipped, as in the
  single-process trainer). See docs/parallelism.md for why.

megatron-core hard-codes CUDA in these classes (buffers on ``torch.cuda.current_device()``,
``param.type() == 'torch.cuda.FloatTensor'`` checks); the launcher refuses this path without CUDA,
and the CPU tests run it through ``tests/mcore_cpu_shim.py``.
"""

from __future__ import annotations

import torch


def megatron_transformer_config(params_dtype: torch.dtype):
    """The TransformerConfig megatron-core's DDP reads (per-token loss off, no context parallelism)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, params_dtype=params_dtype,
                             bf16=params_dtype == torch.bfloat16, use_cpu_initialization=True)  # fmt: skip


def _process_groups(groups):
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgc = ProcessGroupCollection()
    pgc.dp, pgc.dp_cp, pgc.tp, pgc.pp = groups.dp, groups.dp, groups.tp, groups.pp
    pgc.expt_dp, pgc.ep = ps.get_expert_data_parallel_group(), ps.get_expert_model_parallel_group()  # no experts
    return pgc


class MegatronCoreOptimizer:
    """The trainer's optimizer on the megatron-core path: ``ddp`` (the wrapper of the model, which
    owns the fp32 gradient buffer), ``core`` (megatron-core's optimizer over the model's
    parameters) and ``router`` (a torch AdamW over the router's, or None).

    It answers what the training loop asks of an optimizer: ``param_groups`` (the LR is set on each
    group; the router's carry ``is_router``), :meth:`step`, :meth:`zero_grad`; plus
    :meth:`finish_grad_sync` and :meth:`clip` for the parallel trainer's gradient hooks."""

    def __init__(self, ddp, core, router: torch.optim.Optimizer | None, *, distributed: bool):
        self.ddp, self.core, self.router, self.distributed = ddp, core, router, distributed

    @property
    def param_groups(self) -> list[dict]:
        return list(self.core.param_groups) + (list(self.router.param_groups) if self.router is not None else [])

    def finish_grad_sync(self) -> None:
        """Average the fp32 gradient buffer over the data-parallel group (reduce-scatter with the
        distributed optimizer: each rank then holds the mean for the part it owns)."""
        self.ddp.finish_grad_sync()

    def clip(self, max_norm: float) -> float:
        """Copy the reduced gradients to the fp32 main parameters, take their global norm (TP duplicates
        counted once, over every stage and shard) and clip to ``max_norm`` (0 = no clipping), as
        ``torch.nn.utils.clip_grad_norm_`` does (coefficient max_norm / (norm + 1e-6), only when < 1);
        returns the norm before clipping. The router's gradients are not part of it (as in one process)."""
        self.core.prepare_grads()
        if max_norm > 0:
            return float(self.core.clip_grad_norm(max_norm))
        return float(self.core.get_grad_norm())

    def step(self) -> None:
        """Adam on the fp32 main parameters, then their copy into the model's weights (all-gathered over
        the data-parallel group with the distributed optimizer); the router's AdamW."""
        self.core.step_with_ready_grads()
        if self.router is not None:
            self.router.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.ddp.zero_grad_buffer()
        self.core.zero_grad(set_to_none=set_to_none)
        if self.router is not None:
            self.router.zero_grad(set_to_none=set_to_none)

    def sharded_state_dict(self, model_sharded: dict, *, is_loading: bool) -> dict:
        """megatron-core's sharded optimizer state for dist_checkpointing. ``model_sharded``: a
        ShardedTensor per model parameter (its ``data`` the parameter itself) naming its global tensor.
        The distributed optimizer writes megatron-core's ``dp_reshardable`` format (each rank the
        buckets it owns; another DP size reads them back), the mixed-precision one a tensor per
        parameter and state."""
        if is_loading:  # a fresh optimizer has no state yet: the zero state the load fills
            self.core.init_state_fn(self.core.optimizer)
        state = self.core.sharded_state_dict(model_sharded, is_loading=is_loading,
                                             metadata={"distrib_optim_sharding_type": "dp_reshardable"})  # fmt: skip
        if self.distributed:  # megatron-core keeps the step only where TE / Apex are absent: keep it here
            steps = {float(st["step"]) for st in self.core.optimizer.state.values() if "step" in st}
            state["adam_step"] = steps.pop() if len(steps) == 1 else 0.0
        return state

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict) -> None:
        """Load what :meth:`sharded_state_dict` describes (filled by dist_checkpointing)."""
        self.core.load_state_dict(state)
        if self.distributed:
            # megatron-core restores the step count into ONE tensor shared by every parameter (and only
            # without TE / Apex installed), then overwrites it with the bucket's placeholder step; torch's
            # AdamW increments each parameter's step in place. Give each its own tensor of the saved count.
            for st in self.core.optimizer.state.values():
                st["step"] = torch.tensor(float(state["adam_step"]), dtype=torch.float32)

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: the fp32 main weights that are not the weights
        themselves (float32 weights are their own main weights), the Adam moments and step counts, and
        the router's AdamW state."""
        weights = {p.untyped_storage().data_ptr() for p in self.ddp.module.parameters()}
        seen, total = set(), 0

        def add(t):
            nonlocal total
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()

        opts = [self.core.optimizer] + ([self.router] if self.router is not None else [])
        for opt in opts:
            for group in opt.param_groups:
                for p in group["params"]:
                    if opt is self.core.optimizer and p.untyped_storage().data_ptr() not in weights:
                        add(p)
                    for v in opt.state.get(p, {}).values():
                        if isinstance(v, torch.Tensor):
                            add(v)
        return total


def build_megatron_optimizer(model: torch.nn.Module, torch_optimizer: torch.optim.AdamW, groups, train_cfg, *,
                             params_dtype: torch.dtype, distributed: bool) -> MegatronCoreOptimizer:  # fmt: skip
    """Wrap ``model`` (this rank's part, already in ``params_dtype``) in megatron-core's DDP and hand
    the model parameter groups of ``torch_optimizer`` (the single-process trainer's AdamW, router
    group flagged ``is_router`` included) to megatron-core's mixed-precision optimizer
    (``distributed``: the distributed optimizer; else Float16OptimizerWithFloat16Params, which at
    float32 weights still keeps fp32 main copies). Every rank of the data-parallel group calls it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params, OptimizerConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               overlap_param_gather=False, use_distributed_optimizer=distributed,
                                               average_in_collective=False)  # fmt: skip
    ddp = DistributedDataParallel(megatron_transformer_config(params_dtype), ddp_config, model,
                                  disable_bucketing=True, pg_collection=_process_groups(groups))  # fmt: skip
    tc = train_cfg
    config = OptimizerConfig(optimizer="adam", lr=tc.lr, min_lr=tc.min_lr, weight_decay=tc.weight_decay,
                             adam_beta1=tc.adam_beta1, adam_beta2=tc.adam_beta2, adam_eps=tc.adam_eps,
                             clip_grad=tc.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
                             use_distributed_optimizer=distributed)  # fmt: skip
    model_groups, router_groups = [], []
    for g in torch_optimizer.param_groups:
        group = {k: v for k, v in g.items() if k != "params"}
        group["params"] = list(g["params"])
        if g.get("is_router"):
            router_groups.append(group)
        else:  # the keys megatron-core's distributed checkpoint matches parameter groups by
            # (megatron-core tells groups apart by these keys only: wd_mult 0 marks the no-decay group)
            model_groups.append({**group, "wd_mult": 1.0 if group["weight_decay"] > 0 else 0.0, "lr_mult": 1.0,
                                 "is_expert_parallel": False, "is_decoupled_lr": False})  # fmt: skip
    defaults = {k: torch_optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
    inner = torch.optim.AdamW(model_groups, foreach=False, **defaults)

    def init_state(opt, config=None):  # what torch's AdamW creates at its first step (a checkpoint fills it)
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data, memory_format=torch.preserve_format)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data, memory_format=torch.preserve_format)

    if distributed:
        core = DistributedOptimizer(inner, config, None, init_state, model_chunks=[ddp],
                                    per_model_buffers={0: ddp.buffers}, data_parallel_group=groups.dp,
                                    data_parallel_group_gloo=None, data_parallel_group_idx=groups.tp_rank + groups.tp_size * groups.pp_rank,
                                    distributed_optimizer_instance_id=0)  # fmt: skip
        core.grad_stats_parallel_group = None  # the world: every rank owns a part of the gradients
    else:
        core = Float16OptimizerWithFloat16Params(inner, config, None, init_state)
        core.grad_stats_parallel_group = _model_parallel_group(groups)
    core.tp_group = groups.tp
    router = torch.optim.AdamW(router_groups, foreach=False, **defaults) if router_groups else None
    return MegatronCoreOptimizer(ddp, core, router, distributed=distributed)


def _model_parallel_group(groups):
    """The TP x PP ranks of this data-parallel replica (the grad norm is summed over them)."""
    from megatron.core import parallel_state as ps

    return ps.get_model_parallel_group()
