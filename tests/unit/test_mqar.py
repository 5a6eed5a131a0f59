"""The MQAR generator, its accuracy metric and the text/MQAR mixed loader."""

import pytest
import torch

from megatron_elastic.errors import ConfigError
from megatron_elastic.eval.mqar import IGNORE, MixedLoader, MQARConfig, accuracy, batch, sequences

CFG = MQARConfig(num_keys=16, num_values=8, num_pairs=6, num_queries=4, key_offset=100, value_offset=200)


def test_sequences_follow_the_layout():
    seq, answer = sequences(CFG, 64, torch.Generator().manual_seed(0))
    P, Q = CFG.num_pairs, CFG.num_queries
    assert seq.shape == (64, 2 * (P + Q)) and answer.shape == seq.shape
    for row, ans in zip(seq.tolist(), answer.tolist()):
        keys, values = row[0 : 2 * P : 2], row[1 : 2 * P : 2]
        assert len(set(keys)) == P and all(100 <= k < 116 for k in keys)
        assert all(200 <= v < 208 for v in values)
        pairs = dict(zip(keys, values))
        asked = row[2 * P :: 2]
        assert len(set(asked)) == Q and set(asked) <= set(keys)
        assert row[2 * P + 1 :: 2] == [pairs[k] for k in asked]
        assert [i for i, a in enumerate(ans) if a] == list(range(2 * P + 1, 2 * (P + Q), 2))
    # every key and value of the ranges shows up over many rows (no off-by-one in the ranges)
    assert set(seq[:, 0 : 2 * P : 2].flatten().tolist()) == set(range(100, 116))
    assert set(seq[:, 1 : 2 * P : 2].flatten().tolist()) == set(range(200, 208))


def test_batch_labels_only_at_answers_and_deterministic():
    tokens, labels = batch(CFG, 8, seed=3, index=5)
    assert tokens.shape == labels.shape == (8, CFG.seq_len)
    seq, _ = sequences(CFG, 8, torch.Generator().manual_seed((3 * 1_000_003 + 5) % 2**63))
    torch.testing.assert_close(tokens, seq[:, :-1])
    kept = labels != IGNORE
    assert kept.sum() == 8 * CFG.num_queries
    torch.testing.assert_close(labels[kept], seq[:, 1:][kept])
    # a query position's input is the asked key, its label the paired value
    assert torch.all((tokens[kept] >= 100) & (tokens[kept] < 116)) and torch.all((labels[kept] >= 200) & (labels[kept] < 208))
    again = batch(CFG, 8, seed=3, index=5)
    assert torch.equal(again[0], tokens) and torch.equal(again[1], labels)
    assert not torch.equal(batch(CFG, 8, seed=3, index=6)[0], tokens)
    assert not torch.equal(batch(CFG, 8, seed=4, index=5)[0], tokens)


class _Oracle(torch.nn.Module):
    """Answers by looking the key up in the context (a perfect recaller), or always says ``const``."""

    def __init__(self, vocab: int, const: int | None = None):
        super().__init__()
        self.vocab, self.const = vocab, const

    def forward(self, tokens):
        b, L = tokens.shape
        logits = torch.zeros(b, L, self.vocab)
        for i in range(b):
            for t in range(L):
                if self.const is not None:
                    logits[i, t, self.const] = 1.0
                    continue
                row = tokens[i, : t].tolist()
                if tokens[i, t] in row:
                    j = row.index(int(tokens[i, t]))
                    logits[i, t, int(tokens[i, j + 1])] = 1.0
        return logits


def test_accuracy_of_a_perfect_and_a_constant_model():
    assert accuracy(_Oracle(256), CFG, num_batches=2, batch_size=8, seed=1) == 1.0
    const = 203
    # reference: the share of answers equal to the constant, counted from the labels
    hits = total = 0
    for i in range(2):
        _, labels = batch(CFG, 8, seed=1, index=i)
        asked = labels[labels != IGNORE]
        hits += int((asked == const).sum())
        total += asked.numel()
    assert total == 2 * 8 * CFG.num_queries
    assert accuracy(_Oracle(256, const), CFG, num_batches=2, batch_size=8, seed=1) == pytest.approx(hits / total)


@pytest.mark.parametrize("kw, message", [
    ({"num_pairs": 20}, "num_pairs=20 exceeds mqar.num_keys=16"),
    ({"num_queries": 7}, "num_queries=7 exceeds mqar.num_pairs=6"),
    ({"value_offset": 110}, "overlap value ids"),
    ({"num_keys": 0}, "mqar.num_keys=0 is invalid"),
])  # fmt: skip
def test_config_errors(kw, message):
    cfg = MQARConfig(**{**CFG.__dict__, **kw})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_ids_must_fit_the_vocabulary():
    with pytest.raises(ConfigError, match="mqar ids reach 207 but the model's vocabulary has 128 tokens"):
        CFG.validate(vocab_size=128)
    CFG.validate(vocab_size=208)


def _text_loader(tmp_path):
    """A real packed loader (in order) over one document 0, 1, ..., 59: sample i starts at token 5 i."""
    from megatron_elastic.data.indexed import write_indexed
    from megatron_elastic.data.loader import PackedDataset, PackedLoader

    prefix = tmp_path / "text"
    if not (tmp_path / "text.bin").exists():
        write_indexed(prefix, [list(range(60))], vocab_size=512)
    return PackedLoader(PackedDataset(prefix, 5), micro_batch_size=2, shuffle=False)


def test_mixed_loader_interleaves_and_resumes_exactly(tmp_path):
    loader = MixedLoader(_text_loader(tmp_path), CFG, every=3, micro_batch_size=2, seed=9)
    got = [next(loader) for _ in range(7)]
    kinds = ["mqar" if t.shape[1] == CFG.seq_len else "text" for t, _ in got]
    assert kinds == ["text", "text", "mqar", "text", "text", "mqar", "text"]
    # the text micro-batches are the text loader's, in order: windows (0, 5), (10, 15), (20, 25), ...
    assert [t[:, 0].tolist() for t, _ in got if t.shape[1] == 5] == [[0, 5], [10, 15], [20, 25], [30, 35], [40, 45]]
    torch.testing.assert_close(got[2][0], batch(CFG, 2, seed=9, index=0)[0])
    torch.testing.assert_close(got[5][0], batch(CFG, 2, seed=9, index=1)[0])
    assert loader.text_tokens == 5 * 10 and loader.mqar_tokens == 2 * 2 * CFG.seq_len

    state = MixedLoader(_text_loader(tmp_path), CFG, every=3, micro_batch_size=2, seed=9)
    for _ in range(4):
        next(state)
    resumed = MixedLoader(_text_loader(tmp_path), CFG, every=3, micro_batch_size=2, seed=9)
    resumed.load_state_dict(state.state_dict())
    for want in got[4:]:
        t, l = next(resumed)
        assert torch.equal(t, want[0]) and torch.equal(l, want[1])
    with pytest.raises(ConfigError, match="another interval or seed"):
        MixedLoader(_text_loader(tmp_path), CFG, every=2, micro_batch_size=2, seed=9).load_state_dict(state.state_dict())
    with pytest.raises(ConfigError, match="MQAR mix interval 0 is invalid"):
        MixedLoader(_text_loader(tmp_path), CFG, every=0, micro_batch_size=2, seed=9)
