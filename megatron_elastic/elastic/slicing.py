"""Zero-shot extraction: slice a (permuted) parent into a real, smaller :class:`HybridLM`.

Invariant (tested for every axis and their combination): for an architecture ``arch``,
``extract(parent, arch)(tokens) == parent(tokens, elastic=hard_state(config, arch))``.
"""

from __future__ import annotations

import torch

from megatron_elastic.elastic.space import Architecture, child_config, child_name, slice_plan
from megatron_elastic.model.hybrid import HybridLM


@torch.no_grad()
def extract(model: HybridLM, arch: Architecture) -> HybridLM:
    """A standalone child model holding the prefix slices of ``model`` that ``arch`` keeps."""
    cfg = model.config
    child = HybridLM(child_config(cfg, arch), init=False)
    parent = model.state_dict()
    # loading copies: the child shares no memory with the parent
    out = {child_name(arch, name): cut.apply(parent[name]) for name, cut in slice_plan(cfg, arch).items()}
    child.load_state_dict(out, strict=True)
    return child.to(next(model.parameters()).dtype).train(model.training)
