"""From a run config's ``data`` section to what the trainer consumes: tokenizer, training loader,
validation batches and the unigram baseline.

``train_prefix: builtin`` tokenizes the built-in corpus once into ``CACHE/builtin-v{V}-{MB}mb_*``
(cache = ``data.cache_dir`` or ``RUN_DIR/cache``) and reuses it afterwards.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_elastic.config import RunConfig
from megatron_elastic.errors import ConfigError, UserError

BUILTIN = "builtin"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class TrainingData:
    tokenizer: object
    train_dataset: object
    valid_dataset: object
    train_loader: object
    micro_batch_size: int
    unigram_baseline: float | None
    train_prefix: str = ""
    eod_id: int | None = None

    def valid_batches(self, n: int):
        """The first ``n`` micro-batches of the validation split, in file order (the same every time)."""
        from megatron_elastic.data.loader import PackedLoader

        per_pass = len(self.valid_dataset) // self.micro_batch_size
        mb = self.micro_batch_size if per_pass else len(self.valid_dataset)
        loader = PackedLoader(self.valid_dataset, micro_batch_size=mb, shuffle=False)
        return itertools.islice(loader, n)


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run_dir) / "cache"


def builtin_prefix(cfg: RunConfig) -> str:
    mb = f"{cfg.data.builtin_max_mb:g}".replace(".", "p")
    return str(cache_dir(cfg) / f"builtin-v{cfg.data.tokenizer_vocab_size}-{mb}mb")


def ensure_builtin_dataset(cfg: RunConfig, log=_log) -> tuple[str, str]:
    """Tokenize the built-in corpus into the cache unless it is already there; returns (train, valid) prefixes."""
    from megatron_elastic.data import indexed
    from megatron_elastic.data.preprocess import preprocess

    prefix = builtin_prefix(cfg)
    train, valid = f"{prefix}_train", f"{prefix}_valid"
    if not (indexed.exists(train) and indexed.exists(valid)):
        log(f"[data] tokenizing the built-in corpus into {prefix}_{{train,valid}} (once)")
        preprocess([BUILTIN], BUILTIN, prefix, cache_dir=cache_dir(cfg), vocab_size=cfg.data.tokenizer_vocab_size,
                   max_bytes=int(cfg.data.builtin_max_mb * 1e6), overwrite=True, log=log)  # fmt: skip
    return train, valid


def build_training_data(cfg: RunConfig, *, dp_rank: int = 0, dp_world_size: int = 1, log=_log) -> TrainingData:
    """Validate and open everything the trainer reads; raises UserError before any training compute."""
    from megatron_elastic.data import indexed
    from megatron_elastic.data.loader import PackedDataset, PackedLoader, unigram_cross_entropy
    from megatron_elastic.data.tokenizer import load_tokenizer

    d = cfg.data
    for name in ("train_prefix", "valid_prefix"):
        prefix = getattr(d, name)
        if prefix != BUILTIN and not indexed.exists(prefix):
            missing = [str(p) for p in indexed.dataset_files(prefix) if not p.exists()]
            raise UserError(
                f"data.{name}={prefix!r}: missing {', '.join(missing) or 'dataset files'}; run "
                "`megatron-elastic data preprocess` to create it or fix the path"
            )
    tokenizer = load_tokenizer(d.tokenizer, cache_dir(cfg), d.tokenizer_vocab_size, log=log)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {d.tokenizer!r} has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
    if BUILTIN in (d.train_prefix, d.valid_prefix):
        if d.tokenizer != BUILTIN:
            raise ConfigError(
                "data.train_prefix/valid_prefix=builtin needs data.tokenizer=builtin; preprocess the corpus "
                "with your tokenizer (`megatron-elastic data preprocess --input builtin --tokenizer T ...`)"
            )
        builtin_train, builtin_valid = ensure_builtin_dataset(cfg, log)
    train_prefix = builtin_train if d.train_prefix == BUILTIN else d.train_prefix
    valid_prefix = builtin_valid if d.valid_prefix == BUILTIN else d.valid_prefix
    eod = tokenizer.eod_id
    train_ds = PackedDataset(train_prefix, d.seq_len, eod_id=eod)
    valid_ds = PackedDataset(valid_prefix, d.seq_len, eod_id=eod)
    tc = cfg.train
    loader = PackedLoader(train_ds, micro_batch_size=tc.micro_batch_size, global_batch_size=tc.global_batch_size,
                          dp_rank=dp_rank, dp_world_size=dp_world_size, seed=tc.seed)  # fmt: skip
    baseline = unigram_cross_entropy(valid_ds, train_ds, vocab_size=tokenizer.vocab_size, eod_id=eod)
    return TrainingData(tokenizer, train_ds, valid_ds, loader, tc.micro_batch_size, baseline, train_prefix, eod)
