"""megatron-elastic: elastic nested hybrid Mamba-2/attention/MLP language models.

Heavy modules (torch, transformers) are imported on first use so that ``megatron-elastic --help``
and ``--version`` answer at once.
"""

from megatron_elastic.utils.lazy import lazy_exports
from megatron_elastic.version import __version__

__all__ = ["__version__", "load_pretrained", "HybridConfig", "HybridLM", "ElasticModel"]


__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "load_pretrained": "megatron_elastic.api",
    "HybridConfig": "megatron_elastic.model",
    "HybridLM": "megatron_elastic.model",
    "ElasticModel": "megatron_elastic.inference.elastic_model",
})
