"""Inference: greedy generation with incremental decoding, and serving every budget of a
many-in-one checkpoint from one copy of the parent's weights (:class:`ElasticModel`).

Names are imported on first use so the command line stays fast to start.
"""

from megatron_elastic.utils.lazy import lazy_exports

_EXPORTS = {
    "greedy_generate": "megatron_elastic.inference.generate",
    "ElasticModel": "megatron_elastic.inference.elastic_model",
    "view_child": "megatron_elastic.inference.elastic_model",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
