"""Tokenizers: a Hugging Face ``tokenizer.json``, or a byte-level BPE trained on the built-in corpus.

:func:`load_tokenizer` takes a spec:

- a path to a Hugging Face ``tokenizer.json`` (or to a directory holding one), read with the
  ``tokenizers`` library. The end-of-document token is the ``eos_token`` of a
  ``tokenizer_config.json`` next to it, else the first of :data:`EOS_NAMES` in the vocabulary;
  the beginning-of-document token likewise (``bos_token``, else :data:`BOS_NAMES`), or none.
- ``"builtin"``: a byte-level BPE (ByteLevel pre-tokenizer and decoder, every one of the 256 bytes
  in the initial alphabet, so any text round-trips exactly) trained with ``tokenizers``'
  ``BpeTrainer`` on the train split of the built-in corpus (:mod:`megatron_elastic.data.corpus`),
  capped at ``train_bytes``. Its only special token is ``<|endoftext|>`` (id 0), the EOD. Training
  is deterministic; the result is cached under ``cache_dir`` in a file named after a hash of
  everything that determines it (vocabulary size, byte cap, the corpus file list, the
  ``tokenizers`` version), written to a temporary file and renamed, so concurrent or interrupted
  runs never leave a partial file.

``encode`` never adds special tokens (documents are framed by the data pipeline, which appends the
EOD itself); ``decode`` keeps special tokens, so ``decode(encode(text)) == text`` for a byte-level
tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from megatron_elastic.errors import UserError

BUILTIN = "builtin"
BUILTIN_EOD = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
# About 4 MB of source trains in a few seconds on 2 cores; more text changes the merges little.
DEFAULT_TRAIN_BYTES = 4_000_000
# Bump when the recipe below changes, so old cache files are not reused.
BUILTIN_RECIPE_VERSION = 1
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids the data pipeline needs."""

    def __init__(self, tokenizer, *, name: str, eos_id: int, bos_id: int | None = None):
        self._tok = tokenizer
        self.name = name
        self.eos_id = int(eos_id)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        # Content hash: equal fingerprints mean equal token ids for every text.
        self.fingerprint = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]

    @property
    def eod_id(self) -> int:
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "bos_id": self.bos_id}  # fmt: skip

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"


def default_cache_dir() -> Path:
    """``$MEGATRON_ELASTIC_CACHE`` or ``~/.cache/megatron-elastic``."""
    env = os.environ.get("MEGATRON_ELASTIC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "megatron-elastic"


def load_tokenizer(
    spec: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    train_bytes: int = DEFAULT_TRAIN_BYTES,
    log=None,
) -> TextTokenizer:
    """``"builtin"`` (trained or read from the cache) or a path to a Hugging Face tokenizer.json.

    ``vocab_size`` and ``train_bytes`` only apply to ``"builtin"``; ``log`` (a callable taking a
    string) hears about training.
    """
    if str(spec) == BUILTIN:
        return builtin_tokenizer(cache_dir, vocab_size, train_bytes=train_bytes, log=log)
    return _load_hf(Path(spec))


# ---------------------------------------------------------------------- Hugging Face tokenizer.json
def _special_from_config(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # older files store AddedToken objects
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _load_hf(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"tokenizer file {str(path)!r} does not exist; pass a Hugging Face tokenizer.json (or its directory) "
            f"or {BUILTIN!r}"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 (the Rust library raises a plain Exception for any parse failure)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"tokenizer file {str(path)!r} cannot be read ({first}); it must be a Hugging Face tokenizer.json "
            f"(copy it again) or pass {BUILTIN!r}"
        ) from None
    config = {}
    config_path = path.parent / "tokenizer_config.json"
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(
                f"{str(config_path)!r} is not valid JSON ({exc}); fix or remove it to use the token names in tokenizer.json"
            ) from None

    def pick(key: str, names: tuple[str, ...]) -> int | None:
        configured = _special_from_config(config, key)
        if configured is not None:
            token_id = tok.token_to_id(configured)
            if token_id is None:
                raise UserError(
                    f"{str(config_path)!r} names {key} {configured!r}, which is not in {str(path)!r}; "
                    "fix tokenizer_config.json or the tokenizer"
                )
            return token_id
        for name in names:
            if (token_id := tok.token_to_id(name)) is not None:
                return token_id
        return None

    eos_id = pick("eos_token", EOS_NAMES)
    if eos_id is None:
        raise UserError(
            f"tokenizer {str(path)!r} has no end-of-document token (none of {', '.join(EOS_NAMES)}); "
            "set eos_token in a tokenizer_config.json next to it"
        )
    return TextTokenizer(tok, name=str(path), eos_id=eos_id, bos_id=pick("bos_token", BOS_NAMES))


# ---------------------------------------------------------------------- built-in byte-level BPE
def _builtin_key(vocab_size: int, train_bytes: int) -> str:
    import tokenizers

    from megatron_elastic.data.corpus import corpus_fingerprint

    parts = [
        f"recipe={BUILTIN_RECIPE_VERSION}",
        f"vocab_size={vocab_size}",
        f"train_bytes={train_bytes}",
        f"corpus={corpus_fingerprint('train', max_bytes=train_bytes)}",
        f"tokenizers={tokenizers.__version__}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def train_builtin(vocab_size: int, *, train_bytes: int = DEFAULT_TRAIN_BYTES):
    """Train the built-in byte-level BPE; returns a ``tokenizers.Tokenizer`` (not cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_elastic.data.corpus import builtin_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BUILTIN_EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(builtin_documents("train", max_bytes=train_bytes)), trainer=trainer)
    return tok


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def builtin_tokenizer(
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    train_bytes: int = DEFAULT_TRAIN_BYTES,
    log=None,
) -> TextTokenizer:
    """The built-in byte-level BPE of ``vocab_size`` tokens, trained once and then read from the cache."""
    from tokenizers import Tokenizer

    # 256 byte tokens + the EOD, and at least one merge so the vocabulary is more than bytes.
    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise UserError(
            f"built-in tokenizer vocab_size must be an integer >= 258 (got {vocab_size!r}); pass a larger --vocab-size"
        )
    if vocab_size > 2**31 - 1:
        raise UserError(f"built-in tokenizer vocab_size {vocab_size} is too large; pass at most 2147483647")
    if train_bytes <= 0:
        raise UserError(f"train_bytes must be positive (got {train_bytes}); pass a byte count such as 4000000")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = _builtin_key(vocab_size, train_bytes)
    path = cache_dir / f"builtin-bpe-{vocab_size}-{key}.json"
    name = f"builtin-bpe-{vocab_size}"
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception:  # noqa: BLE001 (a damaged cache file is rebuilt, never trusted)
            tok = None
        if tok is not None:
            return TextTokenizer(tok, name=name, eos_id=tok.token_to_id(BUILTIN_EOD))
    start = time.perf_counter()
    tok = train_builtin(vocab_size, train_bytes=train_bytes)
    if tok.get_vocab_size() < vocab_size and log is not None:
        log(f"built-in tokenizer: the corpus cap of {train_bytes} bytes only supports {tok.get_vocab_size()} tokens")
    try:
        _atomic_write_text(path, tok.to_str())
    except OSError as exc:
        raise UserError(
            f"cannot write the tokenizer cache {str(path)!r} ({exc.strerror or exc}); pass a writable --cache-dir"
        ) from None
    if log is not None:
        log(f"trained {name} on {train_bytes / 1e6:.1f} MB of the built-in corpus in "
            f"{time.perf_counter() - start:.1f} s -> {path}")  # fmt: skip
    return TextTokenizer(tok, name=name, eos_id=tok.token_to_id(BUILTIN_EOD))
