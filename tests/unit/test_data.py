"""Data layer: built-in corpus, tokenizers, Megatron .bin/.idx files and `data preprocess`.

megatron-core's own ``IndexedDataset`` is the reader no one here wrote: the files we write must
read back through it token for token. Every user error must be one line naming the fix, with
nothing written.
"""

import argparse
import json
import os
import sysconfig

import numpy as np
import pytest

from megatron_elastic.data import corpus
from megatron_elastic.data.indexed import IndexedTokens, open_megatron, write_indexed
from megatron_elastic.data.preprocess import add_data_subcommands, preprocess
from megatron_elastic.data.tokenizer import BUILTIN_EOD, load_tokenizer, train_builtin
from megatron_elastic.errors import UserError

VOCAB = 512
TRAIN_BYTES = 400_000  # small cap: trains in well under a second
MAX_BYTES = 150_000


def shared_cache(tmp_path_factory):
    # One cache for the whole session (test_data_*.py use the same path), so training happens once.
    path = tmp_path_factory.getbasetemp() / "tokenizer-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return load_tokenizer("builtin", shared_cache(tmp_path_factory), VOCAB, train_bytes=TRAIN_BYTES)


@pytest.fixture(scope="session")
def builtin_prefix(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("pre") / "py"
    summary = preprocess(["builtin"], "builtin", str(out), cache_dir=shared_cache(tmp_path_factory), vocab_size=VOCAB,
                         train_bytes=TRAIN_BYTES, max_bytes=MAX_BYTES, log=None)  # fmt: skip
    return out, summary


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def listing(path):
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------------- corpus
def test_builtin_corpus_splits_are_disjoint_sorted_and_exclude_tests():
    root = corpus.stdlib_root()
    assert root == type(root)(sysconfig.get_paths()["stdlib"])
    train, valid = corpus.corpus_files("train"), corpus.corpus_files("valid")
    rels = {r for r, _ in train} | {r for r, _ in valid}
    assert len(rels) == len(train) + len(valid)  # disjoint
    assert [r for r, _ in train] == sorted(r for r, _ in train)
    assert 0.02 < len(valid) / len(rels) < 0.10  # ~5% by hash
    assert all(corpus.split_of(r) == "valid" for r, _ in valid)
    for rel in rels:
        parts = rel.split("/")
        assert rel.endswith(".py")
        assert not set(parts[:-1]) & {"test", "tests", "site-packages", "idlelib", "idle_test", "encodings"}, rel
        assert not parts[-1].startswith("_sysconfigdata_"), rel
    assert "argparse.py" in rels and "json/decoder.py" in rels and "asyncio/tasks.py" in rels
    assert all(size > 0 for _, size in train + valid)
    paths = corpus.builtin_corpus("valid")
    assert paths == [root / r for r, _ in valid]
    desc = corpus.describe_corpus()
    assert str(root) in desc and "site-packages" in desc and "tests" in desc and "5%" in desc


def test_builtin_corpus_max_bytes_is_a_deterministic_cap():
    full = dict(corpus.corpus_files("train"))
    capped = corpus.corpus_files("train", max_bytes=300_000)
    assert capped == corpus.corpus_files("train", max_bytes=300_000)
    total = sum(s for _, s in capped)
    assert 250_000 < total <= 300_000
    assert [r for r, _ in capped] == sorted(r for r, _ in capped)
    assert all(full[r] == s for r, s in capped)
    texts = list(corpus.builtin_documents("train", max_bytes=300_000))
    assert sum(len(t.encode("utf-8")) for t in texts) == total


def test_corpus_rules_on_a_fake_stdlib(tmp_path):
    files = {
        "os.py": b"import sys\n",
        "json/__init__.py": b"x = 1\n",
        "json/empty.py": b"",
        "notes.txt": b"not python",
        "latin1.py": "s = 'caf\u00e9'\n".encode("latin-1"),
        "_sysconfigdata__linux.py": b"build = {}\n",
        "test/test_os.py": b"pass\n",
        "unittest/test/test_case.py": b"pass\n",
        "lib2to3/tests/data/bad.py": b"pass\n",
        "idlelib/editor.py": b"pass\n",
        "encodings/cp1252.py": b"pass\n",
        "pydoc_data/topics.py": b"pass\n",
        "site-packages/numpy/core.py": b"pass\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": b"pass\n",
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    got = [r for r, _ in corpus._all_files(tmp_path)]
    assert got == ["json/__init__.py", "latin1.py", "os.py"]
    assert {r: corpus.split_of(r) for r in got} == {"json/__init__.py": "train", "latin1.py": "train", "os.py": "train"}
    assert corpus.builtin_corpus("train", root=tmp_path) == [tmp_path / r for r in got]
    # The undecodable file is listed but never yields a document.
    docs = list(corpus.iter_documents([tmp_path / r for r in got]))
    assert docs == ["x = 1\n", "import sys\n"]


def test_corpus_errors_are_one_line():
    with pytest.raises(UserError) as e:
        corpus.corpus_files("test")
    one_line_error(e, "'test'", "train, valid")
    with pytest.raises(UserError) as e:
        corpus.corpus_files("valid", max_bytes=10)
    one_line_error(e, "empty", "raise max_bytes")


# ---------------------------------------------------------------------- tokenizer
def test_builtin_tokenizer_training_is_deterministic():
    a = train_builtin(300, train_bytes=200_000).to_str()
    b = train_builtin(300, train_bytes=200_000).to_str()
    assert a == b
    vocab = json.loads(a)["model"]["vocab"]
    assert len(vocab) == 300 and vocab[BUILTIN_EOD] == 0


def test_builtin_tokenizer_round_trips_stdlib_source(tok):
    assert tok.vocab_size == VOCAB and tok.eos_id == tok.eod_id == 0 and tok.bos_id is None
    assert tok.name == "builtin-bpe-512" and len(tok.fingerprint) == 16
    texts = [t[:3000] for t in corpus.builtin_documents("valid")][:8]
    texts += ["caf\u00e9 \u2713 \u65e5\u672c\u8a9e \U0001f600\ttabs\r\n", "  leading spaces", "a<|endoftext|>b", ""]
    n_bytes = n_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB for i in ids)
        assert tok.decode(ids) == text
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
    assert tok.encode("a<|endoftext|>b")[1] == tok.eos_id  # the special token is one id
    assert tok.encode_batch(texts[:3]) == [tok.encode(t) for t in texts[:3]]
    assert 0.3 < n_tokens / n_bytes < 0.7  # merges happened: well under one token per byte


def test_builtin_tokenizer_is_cached_atomically(tmp_path_factory, tok, monkeypatch):
    cache = shared_cache(tmp_path_factory)
    files = [p.name for p in cache.iterdir()]
    assert any(f.startswith(f"builtin-bpe-{VOCAB}-") and f.endswith(".json") for f in files), files
    assert not [f for f in files if ".tmp-" in f]

    def boom(*a, **k):
        raise AssertionError("the cached tokenizer was trained again")

    monkeypatch.setattr("megatron_elastic.data.tokenizer.train_builtin", boom)
    again = load_tokenizer("builtin", cache, VOCAB, train_bytes=TRAIN_BYTES)
    assert again.fingerprint == tok.fingerprint


def write_wordlevel(path, vocab, config=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    t.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path / "tokenizer.json"


def test_hf_tokenizer_json_picks_eos_and_bos(tmp_path, tok):
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<|eot|>": 5}
    plain = write_wordlevel(tmp_path / "plain", vocab)
    t = load_tokenizer(str(plain))
    assert (t.eos_id, t.bos_id, t.vocab_size) == (2, 1, 6)
    assert t.encode("hello world") == [3, 4]
    assert t.name == str(plain)
    # A directory works too, and tokenizer_config.json wins over the common names (either format).
    configured = write_wordlevel(tmp_path / "cfg", vocab, {"eos_token": {"content": "<|eot|>"}, "bos_token": None})
    t = load_tokenizer(str(configured.parent))
    assert (t.eos_id, t.bos_id) == (5, 1)
    # Our own builtin file, loaded as a Hugging Face tokenizer.json, is the same tokenizer.
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "tokenizer.json").write_text(tok._tok.to_str())
    same = load_tokenizer(str(tmp_path / "own" / "tokenizer.json"))
    assert same.fingerprint == tok.fingerprint and same.eos_id == tok.eos_id


def test_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        load_tokenizer(str(tmp_path / "nope.json"))
    one_line_error(e, "nope.json", "does not exist", "'builtin'")
    with pytest.raises(UserError) as e:
        load_tokenizer(str(tmp_path))  # a directory without tokenizer.json
    one_line_error(e, "tokenizer.json", "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError) as e:
        load_tokenizer(str(bad))
    one_line_error(e, "bad.json", "cannot be read", "tokenizer.json")
    no_eos = write_wordlevel(tmp_path / "noeos", {"[UNK]": 0, "a": 1})
    with pytest.raises(UserError) as e:
        load_tokenizer(str(no_eos))
    one_line_error(e, "no end-of-document token", "eos_token", "tokenizer_config.json")
    wrong = write_wordlevel(tmp_path / "wrong", {"[UNK]": 0, "a": 1}, {"eos_token": "</s>"})
    with pytest.raises(UserError) as e:
        load_tokenizer(str(wrong))
    one_line_error(e, "'</s>'", "not in")
    with pytest.raises(UserError) as e:
        load_tokenizer("builtin", tmp_path, 100)
    one_line_error(e, "vocab_size", ">= 258", "--vocab-size")


# ---------------------------------------------------------------------- indexed files
def random_docs(rng, n, high):
    lengths = rng.integers(0, 50, size=n)
    lengths[3] = 0  # an empty document must survive too
    return [rng.integers(0, high, size=int(k)).tolist() for k in lengths]


@pytest.mark.parametrize("vocab_size, dtype", [(512, "uint16"), (65535, "int32"), (200_000, "int32")])
def test_write_read_round_trip_and_megatron_reads_it(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(vocab_size)
    docs = random_docs(rng, 40, vocab_size)
    docs[0] = [0, vocab_size - 1]  # the extremes of the id range
    prefix = tmp_path / "ds"
    summary = write_indexed(prefix, docs, vocab_size=vocab_size, meta={"note": "x"})
    assert summary == {"prefix": str(prefix), "documents": 40, "tokens": sum(map(len, docs)), "dtype": dtype}
    assert listing(tmp_path) == ["ds.bin", "ds.idx", "ds.meta.json"]
    ours = IndexedTokens(prefix)
    assert len(ours) == 40 and ours.dtype == np.dtype(dtype) and ours.num_tokens == summary["tokens"]
    assert [ours[i].tolist() for i in range(40)] == docs
    assert ours.meta["note"] == "x" and ours.meta["documents"] == 40
    theirs = open_megatron(prefix)  # megatron-core's own reader
    assert len(theirs) == 40
    assert theirs.index.dtype == np.dtype(dtype).type
    assert theirs.sequence_lengths.tolist() == [len(d) for d in docs]
    assert theirs.document_indices.tolist() == list(range(41))
    assert [theirs[i].tolist() for i in range(40)] == docs
    k = next(i for i, d in enumerate(docs) if len(d) >= 3)
    assert theirs.get(k, offset=1, length=2).tolist() == docs[k][1:3]


def test_write_refuses_out_of_range_ids_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="token ids must lie in"):
        write_indexed(tmp_path / "ds", [[1, 2], [70_000]], np.uint16)
    assert listing(tmp_path) == []

    def docs_then_crash():
        yield [1, 2, 3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_indexed(tmp_path / "ds", docs_then_crash(), vocab_size=10)
    assert listing(tmp_path) == []


def test_indexed_user_errors_are_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        IndexedTokens(tmp_path / "missing")
    one_line_error(e, str(tmp_path / "missing"), "missing.bin and missing.idx", "data preprocess")
    write_indexed(tmp_path / "ds", [[1, 2, 3], [4]], vocab_size=10)
    with pytest.raises(UserError) as e:
        write_indexed(tmp_path / "ds", [[1]], vocab_size=10)
    one_line_error(e, "already exists", "--overwrite")
    write_indexed(tmp_path / "ds", [[7]], vocab_size=10, overwrite=True)
    assert IndexedTokens(tmp_path / "ds")[0].tolist() == [7]
    data = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "ds.bin").write_bytes(data + b"\0\0")
    with pytest.raises(UserError) as e:
        IndexedTokens(tmp_path / "ds")
    one_line_error(e, "ds.bin", "mismatched", "re-run")
    (tmp_path / "ds.idx").write_bytes(b"garbage")
    with pytest.raises(UserError) as e:
        IndexedTokens(tmp_path / "ds")
    one_line_error(e, "not a Megatron index file")


# ---------------------------------------------------------------------- preprocess
def test_preprocess_builtin_writes_both_splits_exactly(builtin_prefix, tok):
    prefix, summary = builtin_prefix
    assert set(summary["outputs"]) == {"train", "valid"}
    assert summary["tokenizer"]["fingerprint"] == tok.fingerprint
    assert listing(prefix.parent) == sorted(
        f"py_{s}{ext}" for s in ("train", "valid") for ext in (".bin", ".idx", ".meta.json")
    )
    for split, stats in summary["outputs"].items():
        docs = list(corpus.builtin_documents(split, max_bytes=MAX_BYTES))
        read = IndexedTokens(f"{prefix}_{split}")
        assert stats["documents"] == len(read) == len(docs)
        assert stats["bytes"] == sum(len(d.encode("utf-8")) for d in docs) <= MAX_BYTES
        for i, doc in enumerate(docs):
            assert read[i].tolist() == tok.encode(doc) + [tok.eod_id]
        assert stats["tokens"] == read.num_tokens
        meta = read.meta
        assert meta["eod_id"] == 0 and meta["split"] == split and meta["tokenizer"]["name"] == "builtin-bpe-512"


def test_preprocess_text_and_jsonl(tmp_path, tok, tmp_path_factory):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first doc", "id": 1}) + "\n\n" + json.dumps({"text": ""}) + "\n"
        + json.dumps({"text": "caf\u00e9 \u2713", "meta": {"k": 1}}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out" / "ds"
    logs = []
    summary = preprocess([str(tmp_path / n) for n in ("a.txt", "empty.txt", "b.jsonl")], "builtin", str(out),
                         cache_dir=shared_cache(tmp_path_factory), vocab_size=VOCAB, train_bytes=TRAIN_BYTES,
                         log=logs.append)  # fmt: skip
    stats = summary["outputs"]["all"]
    assert stats["documents"] == 3 and stats["documents_skipped"] == 2
    read = IndexedTokens(out)
    texts = ["def f(x):\n    return x\n", "first doc", "caf\u00e9 \u2713"]
    assert [read[i].tolist() for i in range(3)] == [tok.encode(t) + [0] for t in texts]
    assert any("3 documents" in line and "tokens" in line and "MB" in line for line in logs), logs
    # Without EOD, and another key.
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x y"}) + "\n")
    preprocess([str(tmp_path / "c.jsonl")], "builtin", str(tmp_path / "c"), cache_dir=shared_cache(tmp_path_factory),
               vocab_size=VOCAB, train_bytes=TRAIN_BYTES, json_key="body", append_eod=False, log=None)  # fmt: skip
    assert IndexedTokens(tmp_path / "c")[0].tolist() == tok.encode("x y")


def test_preprocess_user_errors_write_nothing(tmp_path, tmp_path_factory):
    good = tmp_path / "good.txt"
    good.write_text("hello")
    kw = {"cache_dir": shared_cache(tmp_path_factory), "vocab_size": VOCAB, "train_bytes": TRAIN_BYTES, "log": None}
    out = str(tmp_path / "out" / "ds")

    def fails(inputs, *needles, tokenizer="builtin", prefix=out, **extra):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        with pytest.raises(UserError) as e:
            preprocess([str(i) for i in inputs], tokenizer, prefix, **{**kw, **extra})
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
        return one_line_error(e, *needles)

    fails([good, tmp_path / "missing.txt"], "missing.txt", "does not exist")
    fails([tmp_path], "is a directory")
    fails([], "no input")
    fails(["builtin", good], "'builtin' must be the only input")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": "oops"\n')
    fails([good, bad_json], f"{bad_json}:2", "not valid JSON")
    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    fails([no_key], f"{no_key}:3", "no 'text' field", "--json-key")
    not_str = tmp_path / "notstr.jsonl"
    not_str.write_text('{"text": 5}\n')
    fails([not_str], f"{not_str}:1", "not a string")
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text("[1, 2]\n")
    fails([not_obj], f"{not_obj}:1", "no 'text' field")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    fails([empty], "no non-empty document")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    fails([binary], "bin.txt", "not UTF-8")
    fails([good], "tokenizer.json", "does not exist", tokenizer=str(tmp_path / "tok" / "tokenizer.json"))
    fails([good], "names a directory", prefix=str(tmp_path))
    # An existing output is refused before anything is tokenized.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ds.idx").write_bytes(b"old")
    fails([good], "ds.idx", "already exists", "--overwrite")
    assert (tmp_path / "out" / "ds.idx").read_bytes() == b"old"


def test_data_preprocess_subcommand(tmp_path, tmp_path_factory, capsys):
    parser = argparse.ArgumentParser(prog="megatron-elastic")
    add_data_subcommands(parser.add_subparsers(dest="command"))
    (tmp_path / "a.jsonl").write_text('{"text": "print(1)"}\n{"text": "print(2)"}\n')
    args = parser.parse_args([
        "data", "preprocess", "--input", str(tmp_path / "a.jsonl"), "--tokenizer", "builtin",
        "--output-prefix", str(tmp_path / "ds"), "--vocab-size", str(VOCAB), "--train-bytes", str(TRAIN_BYTES),
        "--cache-dir", str(shared_cache(tmp_path_factory)),
    ])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'ds'}.bin/.idx: 2 documents" in out and "builtin-bpe-512" in out
    assert len(IndexedTokens(tmp_path / "ds")) == 2


def test_cli_reports_data_errors_on_one_line(tmp_path, capsys):
    from megatron_elastic import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "data" not in commands:
        pytest.skip("cli.py does not register the `data` command")
    code = cli.main(["data", "preprocess", "--input", str(tmp_path / "nope.txt"), "--tokenizer", "builtin",
                     "--output-prefix", str(tmp_path / "ds")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.txt" in err[0] and "does not exist" in err[0], err
    assert os.listdir(tmp_path) == []
