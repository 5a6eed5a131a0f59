"""megatron-elastic: elastic nested hybrid Mamba-2/attention/MLP language models.

Heavy modules (torch, transformers) are imported on first use so that ``megatron-elastic --help``
and ``--version`` answer at once.
"""

from megatron_elastic.version import __version__

__all__ = ["__version__", "load_pretrained", "HybridConfig", "HybridLM", "ElasticModel"]


def __getattr__(name):
    if name == "load_pretrained":
        from megatron_elastic.api import load_pretrained

        return load_pretrained
    if name in ("HybridConfig", "HybridLM"):
        from megatron_elastic import model

        return getattr(model, name)
    if name == "ElasticModel":
        from megatron_elastic.inference.elastic_model import ElasticModel

        return ElasticModel
    raise AttributeError(f"module 'megatron_elastic' has no attribute {name!r}")
