"""``megatron-elastic data preprocess``: text files, JSON Lines or the built-in corpus -> .bin/.idx.

Inputs:

- a plain text file (any name not ending in ``.jsonl``): one document, the whole file, UTF-8;
- a ``.jsonl`` file: one document per non-blank line, a JSON object whose ``json_key`` field
  (default ``text``) is a string;
- the word ``builtin`` (alone): the built-in corpus (:mod:`megatron_elastic.data.corpus`). Both of
  its splits are written, as ``PREFIX_train`` and ``PREFIX_valid``.

Documents with empty text are skipped (and counted). With ``append_eod`` the tokenizer's EOD id is
appended to every document, so packing documents back to back separates them.

Everything is checked before any output is written: inputs exist and decode, every JSON line
parses and has the key, there is at least one document, the outputs do not already exist (unless
``overwrite``), the tokenizer loads. Outputs are written under temporary names and renamed into
place together at the end (:func:`megatron_elastic.data.indexed.atomic_files`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_elastic.errors import UserError

BUILTIN_INPUT = "builtin"
BATCH_DOCUMENTS = 64


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"input {str(path)!r} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise UserError(f"input {str(path)!r} cannot be read ({exc.strerror or exc}); check its permissions") from None


def _jsonl_texts(path: Path, json_key: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line; any bad line is a UserError naming file and line."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise UserError(f"input {str(path)!r} cannot be read ({exc.strerror or exc}); check its permissions") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{where} is not UTF-8; convert the file to UTF-8") from None
            except json.JSONDecodeError as exc:
                raise UserError(f"{where} is not valid JSON ({exc.msg}); write one JSON object per line") from None
            if not isinstance(obj, dict) or json_key not in obj:
                raise UserError(f"{where} has no {json_key!r} field; give every line one, or pass --json-key")
            text = obj[json_key]
            if not isinstance(text, str):
                raise UserError(
                    f"{where}: field {json_key!r} is {type(text).__name__}, not a string; store the text as a string"
                )
            yield lineno, text


def _input_documents(paths: list[Path], json_key: str) -> Iterator[str]:
    for path in paths:
        if path.suffix == ".jsonl":
            for _, text in _jsonl_texts(path, json_key):
                yield text
        else:
            yield _read_text(path)


def _validate_inputs(inputs: list[str], json_key: str) -> tuple[list[Path], int]:
    """Check every input fully (without tokenizing); returns the paths and the number of documents."""
    paths = []
    for name in inputs:
        path = Path(name)
        if not path.exists():
            raise UserError(f"input {name!r} does not exist; pass text or .jsonl files, or {BUILTIN_INPUT!r}")
        if path.is_dir():
            raise UserError(f"input {name!r} is a directory; pass its files (e.g. {name}/*.jsonl)")
        paths.append(path)
    documents = sum(1 for text in _input_documents(paths, json_key) if text)
    if documents == 0:
        raise UserError(f"the inputs ({', '.join(inputs)}) hold no non-empty document; pass files with text in them")
    return paths, documents


def _tokenize_into(builder, texts, tok, append_eod: bool, progress) -> int:
    """Tokenize ``texts`` in batches into ``builder``; returns how many empty texts were skipped."""
    skipped = 0
    batch: list[str] = []

    def flush() -> None:
        ids_list = tok.encode_batch(batch)
        for ids in ids_list:
            builder.add(ids + [tok.eod_id] if append_eod else ids)
        n_tokens = sum(map(len, ids_list)) + (len(batch) if append_eod else 0)
        progress.update(len(batch), n_tokens, sum(len(t.encode("utf-8")) for t in batch))
        batch.clear()

    for text in texts:
        if not text:
            skipped += 1
            continue
        batch.append(text)
        if len(batch) >= BATCH_DOCUMENTS:
            flush()
    if batch:
        flush()
    return skipped


def _output_prefixes(output_prefix: str, builtin: bool) -> dict[str, str]:
    return {"train": f"{output_prefix}_train", "valid": f"{output_prefix}_valid"} if builtin else {"all": output_prefix}


def preprocess(
    inputs: list[str],
    tokenizer_spec: str,
    output_prefix: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    json_key: str = "text",
    append_eod: bool = True,
    max_bytes: int | None = None,
    train_bytes: int | None = None,
    overwrite: bool = False,
    log=_log_stderr,
) -> dict:
    """Tokenize ``inputs`` into Megatron .bin/.idx files; returns a summary dict.

    ``vocab_size`` and ``train_bytes`` configure the built-in tokenizer; ``max_bytes`` caps each
    split of the built-in corpus. ``log`` (a callable taking a string, or None) hears progress.
    """
    from megatron_elastic.data import corpus, indexed
    from megatron_elastic.data.tokenizer import DEFAULT_TRAIN_BYTES, DEFAULT_VOCAB_SIZE, load_tokenizer

    inputs = [str(i) for i in inputs]
    if not inputs:
        raise UserError(f"no input given; pass text files, .jsonl files or {BUILTIN_INPUT!r}")
    builtin = BUILTIN_INPUT in inputs
    if builtin and len(inputs) > 1:
        raise UserError(f"{BUILTIN_INPUT!r} must be the only input; run preprocess separately for your files")
    if not output_prefix or output_prefix.endswith(("/", os.sep)) or Path(output_prefix).is_dir():
        raise UserError(
            f"output prefix {output_prefix!r} names a directory; add a file name stem, e.g. {output_prefix.rstrip('/')}/data"
        )

    # 1. Inputs, before anything is written.
    if builtin:
        sources = {split: corpus.builtin_corpus(split, max_bytes=max_bytes) for split in corpus.SPLITS}
        expected = {split: len(paths) for split, paths in sources.items()}
    else:
        paths, count = _validate_inputs(inputs, json_key)
        sources, expected = {"all": paths}, {"all": count}
    prefixes = _output_prefixes(output_prefix, builtin)
    targets = [p for prefix in prefixes.values() for p in indexed.dataset_files(prefix)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise UserError(f"output {existing[0]!r} already exists; choose a new --output-prefix or pass --overwrite")

    # 2. The tokenizer (training the built-in one writes only to its cache).
    tok = load_tokenizer(
        tokenizer_spec,
        cache_dir,
        vocab_size or DEFAULT_VOCAB_SIZE,
        train_bytes=train_bytes or DEFAULT_TRAIN_BYTES,
        log=log,
    )
    dtype = indexed.token_dtype(tok.vocab_size)

    # 3. Tokenize and write, under temporary names until every output is complete.
    start = time.perf_counter()
    summary = {"inputs": inputs, "tokenizer": tok.describe(), "append_eod": append_eod, "json_key": json_key,
               "outputs": {}}  # fmt: skip
    if builtin:
        summary["corpus"] = corpus.describe_corpus()
        summary["max_bytes"] = max_bytes
    with indexed.atomic_files(targets) as tmps:
        for n, (split, prefix) in enumerate(prefixes.items()):
            tmp_bin, tmp_idx, tmp_meta = tmps[3 * n : 3 * n + 3]
            progress = indexed.Progress(f"preprocess {prefix}", log)
            texts = corpus.iter_documents(sources[split]) if builtin else _input_documents(sources[split], json_key)
            with indexed.IndexedBuilder(tmp_bin, tmp_idx, dtype) as builder:
                skipped = _tokenize_into(builder, texts, tok, append_eod, progress)
                if builder.documents == 0:
                    raise UserError(f"no non-empty document for {prefix!r}; pass inputs with text in them")
                builder.finalize()
            stats = {
                "prefix": prefix,
                "documents": builder.documents,
                "documents_skipped": skipped,
                "tokens": builder.tokens,
                "bytes": progress.bytes,
                "tokens_per_byte": builder.tokens / max(progress.bytes, 1),
                "dtype": builder.dtype.name,
            }
            if builtin:
                stats["files"] = expected[split]
            indexed.write_meta(tmp_meta, {**{k: v for k, v in summary.items() if k != "outputs"}, **stats,
                                           "eod_id": tok.eod_id, "split": split})  # fmt: skip
            summary["outputs"][split] = stats
            if log is not None:
                log(progress.line())
    summary["seconds"] = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------- command line
def cmd_data_preprocess(args) -> int:
    from megatron_elastic.utils.io import check_writable

    check_writable(Path(f"{args.output_prefix}.bin"), "output prefix", kind="file")  # before any tokenizing
    summary = preprocess(
        args.input,
        args.tokenizer,
        args.output_prefix,
        cache_dir=args.cache_dir,
        vocab_size=args.vocab_size,
        json_key=args.json_key,
        append_eod=not args.no_append_eod,
        max_bytes=args.max_bytes,
        train_bytes=args.train_bytes,
        overwrite=args.overwrite,
    )
    tok = summary["tokenizer"]
    print(
        f"tokenizer {tok['name']} (vocab {tok['vocab_size']}, eod id {tok['eos_id']}, fingerprint {tok['fingerprint']})"
    )
    for s in summary["outputs"].values():
        print(f"wrote {s['prefix']}.bin/.idx: {s['documents']:,} documents ({s['documents_skipped']} empty skipped), "
              f"{s['tokens']:,} tokens from {s['bytes'] / 1e6:.2f} MB ({s['tokens_per_byte']:.3f} tokens/byte), "
              f"{s['dtype']}")  # fmt: skip
    return 0


def add_data_subcommands(subparsers) -> None:
    """Register ``data preprocess`` on the top-level subparsers of ``megatron-elastic``."""
    from megatron_elastic.data.tokenizer import DEFAULT_TRAIN_BYTES, DEFAULT_VOCAB_SIZE

    data = subparsers.add_parser("data", help="prepare training data (tokenize into Megatron .bin/.idx files)")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    p = data_sub.add_parser(
        "preprocess",
        help="tokenize text / .jsonl files or the built-in corpus into PREFIX.bin/.idx",
        description="Tokenize documents into Megatron indexed-dataset files. A .jsonl input holds one JSON object "
        "per line (the text in --json-key); any other file is one document. The input 'builtin' is the Python "
        "standard library's source (written as PREFIX_train and PREFIX_valid).",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files, .jsonl files, or 'builtin'")
    p.add_argument(
        "--tokenizer", required=True, help="path to a Hugging Face tokenizer.json (or its directory), or 'builtin'"
    )
    p.add_argument("--output-prefix", required=True, help="write PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="vocabulary of the built-in tokenizer")
    p.add_argument(
        "--train-bytes", type=int, default=DEFAULT_TRAIN_BYTES, help="corpus bytes the built-in tokenizer trains on"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the built-in tokenizer is cached (default: $MEGATRON_ELASTIC_CACHE or ~/.cache/megatron-elastic)",
    )
    p.add_argument("--json-key", default="text", help="field of each .jsonl line that holds the text")
    p.add_argument("--no-append-eod", action="store_true", help="do not end every document with the EOD token")
    p.add_argument(
        "--max-bytes", type=int, default=None, help="cap each split of the built-in corpus at this many bytes"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=cmd_data_preprocess)
    data.set_defaults(func=lambda a: data.print_help() or 2)
