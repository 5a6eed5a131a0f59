"""The data layer: built-in corpus, tokenizers, Megatron .bin/.idx datasets, packed samples and loader.

- :mod:`.corpus`     the Python standard library's source as a built-in, download-free corpus
- :mod:`.tokenizer`  Hugging Face ``tokenizer.json`` or a built-in byte-level BPE (cached)
- :mod:`.indexed`    Megatron indexed-dataset files (written by megatron-core, read with NumPy)
- :mod:`.preprocess` ``megatron-elastic data preprocess``: documents -> .bin/.idx
- :mod:`.loader`     packed ``seq_len + 1`` windows, a seeded, DP-sharded, resumable loader,
                     and the unigram-entropy baseline

Names are imported on first use so that importing this package (the command line does) stays cheap.
"""

from megatron_elastic.utils.lazy import lazy_exports

_EXPORTS = {
    "builtin_corpus": ".corpus",
    "builtin_documents": ".corpus",
    "describe_corpus": ".corpus",
    "iter_documents": ".corpus",
    "TextTokenizer": ".tokenizer",
    "load_tokenizer": ".tokenizer",
    "IndexedTokens": ".indexed",
    "write_indexed": ".indexed",
    "open_megatron": ".indexed",
    "preprocess": ".preprocess",
    "add_data_subcommands": ".preprocess",
    "PackedDataset": ".loader",
    "PackedLoader": ".loader",
    "unigram_entropy": ".loader",
    "unigram_cross_entropy": ".loader",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
