"""Packed samples and the loader: exact windows, seeded order, disjoint DP shards, exact resume.

Datasets here are random token documents written as real Megatron files; expected samples are
computed independently by concatenating the documents in plain Python.
"""

import json
import math

import numpy as np
import pytest
import torch

from megatron_elastic.data.indexed import IndexedTokens, write_indexed
from megatron_elastic.data.loader import PackedDataset, PackedLoader, unigram_cross_entropy, unigram_entropy
from megatron_elastic.errors import UserError

EOD = 0
SEQ = 8


def make_docs(seed, n, *, with_eod):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 100, size=int(k)).tolist() for k in rng.integers(1, 30, size=n)]
    return [d + [EOD] for d in docs] if with_eod else docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    docs_eod = make_docs(0, 60, with_eod=True)
    docs_raw = make_docs(1, 60, with_eod=False)
    docs_raw[5] = []  # an empty document still gets its EOD
    docs_raw[6] = [3, EOD]  # one that already ends with it gets no second one
    write_indexed(root / "eod", docs_eod, vocab_size=100)
    write_indexed(root / "raw", docs_raw, vocab_size=100)
    return {"eod": (root / "eod", docs_eod), "raw": (root / "raw", docs_raw)}


def stream_of(docs, eod):
    out = []
    for d in docs:
        out += d
        if eod is not None and (not d or d[-1] != eod):
            out.append(eod)
    return out


@pytest.mark.parametrize("which, eod_id", [("eod", None), ("eod", EOD), ("raw", EOD), ("raw", None)])
def test_windows_equal_the_concatenated_stream(data, which, eod_id):
    prefix, docs = data[which]
    stream = stream_of(docs, eod_id)
    ds = PackedDataset(prefix, SEQ, eod_id=eod_id)
    assert ds.num_tokens == len(stream)
    assert len(ds) == (len(stream) - 1) // SEQ
    for i in range(len(ds)):
        assert ds[i].tolist() == stream[i * SEQ : (i + 1) * SEQ + 1], i
    assert ds[-1].dtype == np.int64
    # Every stream token but the first (and the dropped tail) is a label exactly once.
    labels = [t for i in range(len(ds)) for t in ds[i][1:].tolist()]
    assert labels == stream[1 : len(ds) * SEQ + 1]
    if which == "raw" and eod_id is not None:
        assert ds.inserted_eods == 59 and not ds._flat


def test_loader_batches_are_the_dataset_windows(data):
    ds = PackedDataset(data["raw"][0], SEQ, eod_id=EOD)
    loader = PackedLoader(ds, micro_batch_size=3, seed=7)
    idx = loader.sample_indices()
    tokens, labels = next(loader)
    assert tokens.dtype == labels.dtype == torch.long and tokens.shape == labels.shape == (3, SEQ)
    expect = torch.from_numpy(np.stack([ds[int(i)] for i in idx]))
    assert torch.equal(tokens, expect[:, :-1]) and torch.equal(labels, expect[:, 1:])
    assert torch.equal(tokens[:, 1:], labels[:, :-1])


def collect(loader, n):
    """n micro-batches as (sample indices, tokens, labels); the indices are read back from the tokens."""
    ds = loader.dataset
    by_window = {ds[i].tobytes(): i for i in range(len(ds))}
    assert len(by_window) == len(ds)  # random documents: every window is distinct
    out = []
    for _ in range(n):
        tokens, labels = next(loader)
        assert tokens.dtype == labels.dtype == torch.long and tokens.shape == (loader.micro_batch_size, ds.seq_len)
        windows = torch.cat([tokens, labels[:, -1:]], dim=1).numpy()
        assert np.array_equal(windows[:, 1:-1], labels[:, :-1].numpy())
        idx = np.array([by_window[w.tobytes()] for w in windows])
        out.append((idx, tokens, labels))
    return out


def test_order_is_seeded_and_reshuffled_every_epoch(data):
    ds = PackedDataset(data["eod"][0], SEQ)
    a = PackedLoader(ds, micro_batch_size=4, seed=1)
    b = PackedLoader(ds, micro_batch_size=4, seed=1)
    c = PackedLoader(ds, micro_batch_size=4, seed=2)
    for (ia, ta, la), (ib, tb, lb) in zip(collect(a, 10), collect(b, 10)):
        assert np.array_equal(ia, ib) and torch.equal(ta, tb) and torch.equal(la, lb)
    assert not np.array_equal(a.order(0), c.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert sorted(a.order(1)) == list(range(len(ds)))
    plain = PackedLoader(ds, micro_batch_size=4, shuffle=False)
    assert [x[0].tolist() for x in collect(plain, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("dp, micro, gbs", [(2, 2, 8), (3, 1, 6), (4, 3, 12)])
def test_dp_shards_are_disjoint_and_cover_each_global_batch(data, dp, micro, gbs):
    ds = PackedDataset(data["raw"][0], SEQ, eod_id=EOD)
    loaders = [PackedLoader(ds, micro_batch_size=micro, global_batch_size=gbs, dp_rank=r, dp_world_size=dp, seed=5)
               for r in range(dp)]  # fmt: skip
    accum = gbs // (micro * dp)
    assert all(lo.grad_accum_steps == accum for lo in loaders)
    assert len(loaders[0]) == (len(ds) // gbs) * accum
    order = loaders[0].order(0)
    seen = []
    for g in range(loaders[0].batches_per_epoch):
        shards = [np.concatenate([x[0] for x in collect(lo, accum)]) for lo in loaders]
        union = np.concatenate(shards)
        assert len(set(union.tolist())) == gbs  # disjoint
        assert sorted(union.tolist()) == sorted(order[g * gbs : (g + 1) * gbs].tolist())  # covering
        seen += union.tolist()
    assert len(seen) == len(set(seen)) == (len(ds) // gbs) * gbs  # no sample twice in an epoch
    assert all(lo.consumed_samples == len(seen) for lo in loaders)


def test_resume_continues_exactly(data):
    ds = PackedDataset(data["raw"][0], SEQ, eod_id=EOD)
    kw = {"micro_batch_size": 2, "global_batch_size": 8, "dp_rank": 1, "dp_world_size": 2, "seed": 11}
    steps_per_epoch = len(PackedLoader(ds, **kw))
    for stop in (0, 5, steps_per_epoch - 1, steps_per_epoch, steps_per_epoch + 3):
        whole = PackedLoader(ds, **kw)
        collect(whole, stop)
        state = json.loads(json.dumps(whole.state_dict()))  # survives a JSON checkpoint
        assert set(state) >= {"epoch", "samples_in_epoch", "consumed_samples"}
        assert state["consumed_samples"] == stop * 4
        resumed = PackedLoader(ds, **kw)
        resumed.load_state_dict(state)
        for (i1, t1, l1), (i2, t2, l2) in zip(
            collect(whole, steps_per_epoch + 2), collect(resumed, steps_per_epoch + 2)
        ):
            assert np.array_equal(i1, i2) and torch.equal(t1, t2) and torch.equal(l1, l2)
        assert resumed.state_dict() == whole.state_dict()


def test_resume_with_another_dp_size_at_a_global_batch_boundary(data):
    ds = PackedDataset(data["eod"][0], SEQ)
    two = [
        PackedLoader(ds, micro_batch_size=2, global_batch_size=8, dp_rank=r, dp_world_size=2, seed=3) for r in range(2)
    ]
    for lo in two:
        collect(lo, 2 * 3)  # three global batches
    state = two[0].state_dict()
    four = [
        PackedLoader(ds, micro_batch_size=1, global_batch_size=8, dp_rank=r, dp_world_size=4, seed=3) for r in range(4)
    ]
    for lo in four:
        lo.load_state_dict(state)
    union = sorted(i for lo in four for x in collect(lo, 2) for i in x[0].tolist())
    assert union == sorted(two[0].order(0)[24:32].tolist())


def test_max_epochs_stops(data):
    ds = PackedDataset(data["eod"][0], SEQ)
    loader = PackedLoader(ds, micro_batch_size=4, shuffle=False, max_epochs=1)
    assert sum(1 for _ in loader) == len(loader) == len(ds) // 4


def test_loader_user_errors_are_one_line(data, tmp_path):
    ds = PackedDataset(data["eod"][0], SEQ)

    def err(fn, *needles):
        with pytest.raises(UserError) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg

    err(lambda: PackedDataset(tmp_path / "nope", SEQ), str(tmp_path / "nope"), "missing", "data preprocess")
    err(lambda: PackedDataset(data["eod"][0], 10**6), "too few", "smaller seq_len")
    err(lambda: PackedDataset(data["eod"][0], 0), "seq_len must be a positive integer")
    err(
        lambda: PackedLoader(ds, micro_batch_size=2, global_batch_size=6, dp_world_size=2),
        "not a positive multiple",
        "= 4",
    )
    err(lambda: PackedLoader(ds, micro_batch_size=2, dp_rank=2, dp_world_size=2), "dp_rank 2")
    err(lambda: PackedLoader(ds, micro_batch_size=1, global_batch_size=len(ds) + 1), "fewer than one global batch")
    state = PackedLoader(ds, micro_batch_size=2, seed=1).state_dict()
    err(lambda: PackedLoader(ds, micro_batch_size=2, seed=2).load_state_dict(state), "seed 1 != 2", "same data")
    other = PackedDataset(data["eod"][0], SEQ + 1)
    err(lambda: PackedLoader(other, micro_batch_size=2, seed=1).load_state_dict(state), "seq_len 8 != 9")
    lo = PackedLoader(ds, micro_batch_size=1, global_batch_size=4, seed=1)
    next(lo)
    err(lambda: PackedLoader(ds, micro_batch_size=2, global_batch_size=4, seed=1).load_state_dict(lo.state_dict()),
        "position 1", "global-batch boundary")  # fmt: skip
    err(lambda: lo.load_state_dict({"epoch": 0}), "incomplete")


def test_unigram_entropy_matches_hand_computation(tmp_path):
    write_indexed(tmp_path / "a", [[1, 1, 2, 0], [3, 0]], vocab_size=8)
    p = np.array([2, 2, 1, 1]) / 6  # counts of 1, 0, 2, 3
    assert unigram_entropy(tmp_path / "a") == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)
    write_indexed(tmp_path / "b", [[1, 1], [2, 2]], vocab_size=8)
    assert unigram_entropy(tmp_path / "b") == pytest.approx(math.log(2))
    # Inserted EODs count: 1 1 0 2 2 0 -> three equally likely tokens.
    assert unigram_entropy(tmp_path / "b", eod_id=0) == pytest.approx(math.log(3))
    # A model fitted on b, scored on a, with add-one smoothing over 8 ids.
    q = (np.array([0, 2, 2, 0, 0, 0, 0, 0]) + 1) / (4 + 8)
    counts_a = np.array([2, 2, 1, 1, 0, 0, 0, 0])
    expect = -(counts_a * np.log(q)).sum() / 6
    assert unigram_cross_entropy(tmp_path / "a", tmp_path / "b", vocab_size=8) == pytest.approx(expect)
    assert unigram_cross_entropy(tmp_path / "a", tmp_path / "a", vocab_size=8, alpha=1e-9) == pytest.approx(
        unigram_entropy(tmp_path / "a"), abs=1e-6
    )
    with pytest.raises(UserError, match="vocab_size 2"):
        unigram_cross_entropy(tmp_path / "a", tmp_path / "b", vocab_size=2)


def test_reader_matches_packed_stream_on_real_text(tmp_path_factory):
    # The builtin tokenizer on a slice of the built-in corpus, end to end: preprocess -> pack -> baseline.
    from megatron_elastic.data.preprocess import preprocess

    cache = tmp_path_factory.getbasetemp() / "tokenizer-cache"
    out = tmp_path_factory.mktemp("real") / "py"
    preprocess(["builtin"], "builtin", str(out), cache_dir=cache, vocab_size=512, train_bytes=400_000,
               max_bytes=60_000, log=None)  # fmt: skip
    train = IndexedTokens(f"{out}_train")
    ds = PackedDataset(train, 64, eod_id=0)
    assert ds.inserted_eods == 0 and ds._flat  # preprocess already ended every document with the EOD
    stream = np.concatenate([train[i] for i in range(len(train))])
    assert np.array_equal(ds[3], stream[3 * 64 : 4 * 64 + 1])
    h = unigram_entropy(ds)
    assert 3.0 < h < math.log(512)
    assert unigram_cross_entropy(f"{out}_valid", ds, vocab_size=512) > unigram_entropy(f"{out}_valid")
