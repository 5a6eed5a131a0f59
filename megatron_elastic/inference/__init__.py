"""Inference: greedy generation with incremental decoding, and serving every budget of a
many-in-one checkpoint from one copy of the parent's weights (:class:`ElasticModel`).

Names are imported on first use so the command line stays fast to start.
"""

import importlib

_EXPORTS = {
    "greedy_generate": "megatron_elastic.inference.generate",
    "ElasticModel": "megatron_elastic.inference.elastic_model",
    "view_child": "megatron_elastic.inference.elastic_model",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_elastic.inference' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
