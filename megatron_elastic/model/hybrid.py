"""The hybrid language model: embedding -> pre-norm residual blocks (Mamba-2 / attention / MLP / MoE) ->
final RMSNorm -> output layer. Single-device PyTorch; parallelism is applied to it afterwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from megatron_elastic.model.config import ATTENTION, LAYER_NAMES, MAMBA, MLP, MOE, RECOMPUTE_MODES, HybridConfig
from megatron_elastic.model.elastic_state import ElasticState, LayerMask
from megatron_elastic.model.layers import MLP as MLPMixer
from megatron_elastic.model.layers import Attention, GatedGroupRMSNorm, Mamba2Mixer, RMSNorm, recomputed
from megatron_elastic.model.moe import Experts, MoE, TopkRouter

# The layer spec: which module implements each pattern symbol. Parallel or fused variants are
# swapped in by passing another mapping, not by branches inside the layers.
REFERENCE_MIXERS: Mapping[str, type[nn.Module]] = {MAMBA: Mamba2Mixer, ATTENTION: Attention, MLP: MLPMixer, MOE: MoE}


class HybridBlock(nn.Module):
    """x + mixer(RMSNorm(x)).  ``recompute_block`` (full recomputation): only the block's input is
    kept for backward; norm, mixer and masks run again there."""

    recompute_block = False  # a class default: the sequence-parallel variant skips this __init__

    def __init__(self, config: HybridConfig, index: int, mixers: Mapping[str, type[nn.Module]]):
        super().__init__()
        dims = config.layer_dims(index)
        self.layer_type = dims.kind
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = mixers[dims.kind](config, dims)

    def forward(self, hidden_BLD: torch.Tensor, hidden_mask: torch.Tensor | None = None,
                mask: LayerMask | None = None) -> torch.Tensor:  # fmt: skip
        keep = 1.0 if mask is None else mask.keep
        if not torch.is_tensor(keep) and keep == 0:
            return hidden_BLD  # a skipped layer is the identity
        return hidden_BLD + recomputed(self.recompute_block, self._branch, hidden_BLD, hidden_mask, mask)

    def _branch(self, hidden_BLD: torch.Tensor, hidden_mask: torch.Tensor | None, mask: LayerMask | None) -> torch.Tensor:
        keep = 1.0 if mask is None else mask.keep
        out = self.mixer(self.norm(hidden_BLD, hidden_mask), mask)
        if hidden_mask is not None:  # keep dropped residual channels at exactly zero
            out = out * hidden_mask.to(out.dtype)
        if torch.is_tensor(keep) or keep != 1:
            out = out * keep
        return out

    def forward_cached(self, hidden_BLD: torch.Tensor, state=None):
        """``forward`` continued from the mixer's decoding state; returns (output, new state).
        Stateless mixers (MLP) keep ``None``."""
        normed = self.norm(hidden_BLD)
        step = getattr(self.mixer, "forward_cached", None)
        if step is None:
            return hidden_BLD + self.mixer(normed), None
        out, state = step(normed, state)
        return hidden_BLD + out, state

    def extra_repr(self) -> str:
        return f"type={LAYER_NAMES[self.layer_type]}"


def set_recompute(model: nn.Module, mode: str) -> None:
    """Activation recomputation for every block of ``model`` (a HybridLM, a pipeline stage, or their
    tensor-parallel versions: apply it after parallelising). ``none`` keeps every intermediate;
    ``selective`` recomputes the cheap, large parts (Mamba conv + scan + gated norm, the attention
    core, the squared ReLU, the routed experts); ``full`` keeps only each block's input and recomputes the block."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is invalid; use one of {', '.join(RECOMPUTE_MODES)}")
    for module in model.modules():
        if isinstance(module, HybridBlock):
            module.recompute_block = mode == "full"
        elif isinstance(module, (Mamba2Mixer, Attention, MLPMixer, MoE)):
            module.recompute_core = mode == "selective"


class OutputHead(nn.Module):
    """logits = hidden @ weight^T in fp32 (weight: the output layer's, or the embedding's when tied).
    A module of its own so that tensor parallelism swaps in a vocabulary-parallel head."""

    def forward(self, hidden_BLD: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_BLD, weight).float()


class HybridLM(nn.Module):
    """Nemotron-H style hybrid LM.  ``model(tokens (b, L) int64) -> logits (b, L, vocab) float32``."""

    def __init__(self, config: HybridConfig, *, mixers: Mapping[str, type[nn.Module]] = REFERENCE_MIXERS,
                 init: bool = True):  # fmt: skip
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(config, i, mixers) for i in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.output_layer = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head = OutputHead()
        if init:
            self.reset_parameters()

    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, tokens: torch.Tensor, elastic: ElasticState | None = None) -> torch.Tensor:
        """Logits of ``tokens``; with ``elastic`` the masks of that state are applied (see
        :mod:`megatron_elastic.model.elastic_state`)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (batch, length); got {tuple(tokens.shape)} {tokens.dtype}")
        hidden_mask = None if elastic is None else elastic.hidden
        if elastic is not None and elastic.layers and len(elastic.layers) != len(self.layers):
            raise ValueError(f"elastic state has {len(elastic.layers)} layer masks for {len(self.layers)} layers")
        hidden = self.embedding(tokens)
        if hidden_mask is not None:
            hidden = hidden * hidden_mask.to(hidden.dtype)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, hidden_mask, None if elastic is None else elastic.layer(i))
        hidden = self.final_norm(hidden, hidden_mask)
        return self.head(hidden, self.output_weight())

    def new_cache(self):
        """An empty :class:`~megatron_elastic.model.cache.InferenceCache` for :meth:`forward_cached`."""
        from megatron_elastic.model.cache import InferenceCache

        return InferenceCache.empty(len(self.layers))

    def forward_cached(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Logits (b, L, vocab) of ``tokens`` (b, L) continuing the sequence held by ``cache``, which
        is advanced past them. A prompt and then one token at a time give what one ``forward`` over
        the whole sequence gives. No elastic masks: decode an extracted or view child instead."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (batch, length); got {tuple(tokens.shape)} {tokens.dtype}")
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layer entries for {len(self.layers)} layers; use model.new_cache()")
        hidden = self.embedding(tokens)
        for i, layer in enumerate(self.layers):
            hidden, cache.layers[i] = layer.forward_cached(hidden, cache.layers[i])
        cache.seq_len += tokens.shape[1]
        hidden = self.final_norm(hidden)
        return self.head(hidden, self.output_weight())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """NemotronH initialisation: N(0, init_std) linears, experts, routers and embedding, zero biases
        (the routers' score-correction bias too), unit norms,
        A = 1..H, D = 1, dt log-uniform in [dt_min, dt_max] (floored) through inverse softplus, Mamba
        out_proj kaiming-uniform scaled by 1/sqrt(num_layers)."""
        c = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=c.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=c.init_std)
            elif isinstance(module, nn.Conv1d):
                module.reset_parameters()  # PyTorch default, as the reference leaves it
            elif isinstance(module, (RMSNorm, GatedGroupRMSNorm)):
                nn.init.ones_(module.weight)
            elif isinstance(module, TopkRouter):
                nn.init.normal_(module.weight, std=c.init_std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                nn.init.normal_(module.up_proj, std=c.init_std)
                nn.init.normal_(module.down_proj, std=c.init_std)
        for module in self.modules():
            if isinstance(module, Mamba2Mixer):
                h = module.num_heads
                module.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
                module.D.fill_(1.0)
                log_lo, log_hi = math.log(c.mamba_dt_min), math.log(c.mamba_dt_max)
                dt = torch.exp(torch.rand(h) * (log_hi - log_lo) + log_lo).clamp(min=c.mamba_dt_init_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
                if c.rescale_prenorm_residual:
                    nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                    module.out_proj.weight.div_(math.sqrt(c.num_layers))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def cast_copy(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A copy of ``model`` with its floating parameters and buffers in ``dtype`` on ``device``, filled tensor by
    tensor: the modules are copied around meta tensors first, so no second copy in the source dtype is ever
    made (a bf16 copy of an fp32 model costs half the model, not one model and a half)."""

    def meta(t: torch.Tensor) -> torch.Tensor:
        empty = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")
        return nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty

    memo = {id(t): meta(t) for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo).to_empty(device=device)
    out.load_state_dict(model.state_dict())  # copy_ per tensor, casting
    return out
