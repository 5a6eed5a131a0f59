"""Multi-query associative recall (MQAR): a synthetic probe of in-context recall.

A sequence lists ``num_pairs`` key-value pairs, then asks ``num_queries`` of the keys again; after
each asked key the model must produce the value it was paired with::

    k_1 v_1 k_2 v_2 ... k_P v_P   q_1 a_1 q_2 a_2 ... q_Q a_Q        (length 2 (P + Q))

Keys are ``num_pairs`` distinct ids drawn from ``[key_offset, key_offset + num_keys)``; values are
drawn (with replacement) from ``[value_offset, value_offset + num_values)``; the queries are
``num_queries`` distinct keys of the context in random order, and ``a_i`` is the value paired with
``q_i``. Token ids are raw ids of the model's vocabulary (no tokenizer involved), so a model sees
the same task whatever text it was trained on.

``(tokens, labels) = (seq[:-1], seq[1:])`` with every label set to :data:`IGNORE` (-100, what
``torch.nn.functional.cross_entropy`` skips) except at the query positions, whose label is the
answer. Accuracy is the fraction of those positions where the argmax over the full vocabulary is
the answer (chance: ``1 / num_values`` for a model that has learnt the value range).

Batches are a pure function of ``(seed, index)``: :func:`batch` with the same arguments returns the
same tensors, so an evaluation set is fixed by its seed and a training stream can resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_elastic.errors import ConfigError

IGNORE = -100


@dataclass(kw_only=True)
class MQARConfig:
    """Shape of the recall task."""

    num_keys: int = 64
    """Size of the key vocabulary (key ids are key_offset .. key_offset + num_keys - 1)."""
    num_values: int = 64
    """Size of the value vocabulary (value_offset .. value_offset + num_values - 1)."""
    num_pairs: int = 8
    """Key-value pairs listed in each sequence (<= num_keys: keys of one sequence are distinct)."""
    num_queries: int = 8
    """Keys asked again after the pairs (<= num_pairs: each asked once)."""
    key_offset: int = 256
    """First key id."""
    value_offset: int = 384
    """First value id (key and value ranges must not overlap)."""

    def validate(self, vocab_size: int | None = None) -> None:
        for name in ("num_keys", "num_values", "num_pairs", "num_queries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"mqar.{name}={v!r} is invalid; it must be a positive integer")
        for name in ("key_offset", "value_offset"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"mqar.{name}={v!r} is invalid; it must be an integer >= 0")
        if self.num_pairs > self.num_keys:
            raise ConfigError(f"mqar.num_pairs={self.num_pairs} exceeds mqar.num_keys={self.num_keys}; keys of one "
                              "sequence are distinct: lower num_pairs or raise num_keys")  # fmt: skip
        if self.num_queries > self.num_pairs:
            raise ConfigError(f"mqar.num_queries={self.num_queries} exceeds mqar.num_pairs={self.num_pairs}; "
                              "lower num_queries")  # fmt: skip
        keys = range(self.key_offset, self.key_offset + self.num_keys)
        values = range(self.value_offset, self.value_offset + self.num_values)
        if keys.start < values.stop and values.start < keys.stop:
            raise ConfigError(f"mqar key ids {keys.start}..{keys.stop - 1} overlap value ids {values.start}.."
                              f"{values.stop - 1}; move key_offset or value_offset apart")  # fmt: skip
        top = max(keys.stop, values.stop)
        if vocab_size is not None and top > vocab_size:
            raise ConfigError(f"mqar ids reach {top - 1} but the model's vocabulary has {vocab_size} tokens; "
                              "lower key_offset / value_offset or the key / value counts")  # fmt: skip

    @property
    def seq_len(self) -> int:
        """Length of ``tokens`` (and ``labels``) of one sample."""
        return 2 * (self.num_pairs + self.num_queries) - 1


def sequences(cfg: MQARConfig, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` full sequences ``(num, 2 (P + Q))`` and the query-position mask ``(num, 2 (P + Q))``
    (True where a token is an answer)."""
    P, Q = cfg.num_pairs, cfg.num_queries
    # Distinct keys per sequence: the first P entries of a random permutation of the key range.
    keys = torch.rand(num, cfg.num_keys, generator=generator).argsort(dim=1)[:, :P] + cfg.key_offset  # (num, P)
    values = torch.randint(cfg.value_offset, cfg.value_offset + cfg.num_values, (num, P), generator=generator)
    asked = torch.rand(num, P, generator=generator).argsort(dim=1)[:, :Q]  # (num, Q) indices into the pairs
    seq = torch.empty(num, 2 * (P + Q), dtype=torch.int64)
    seq[:, 0 : 2 * P : 2] = keys
    seq[:, 1 : 2 * P : 2] = values
    seq[:, 2 * P :: 2] = keys.gather(1, asked)
    seq[:, 2 * P + 1 :: 2] = values.gather(1, asked)
    answer = torch.zeros_like(seq, dtype=torch.bool)
    answer[:, 2 * P + 1 :: 2] = True
    return seq, answer


def batch(cfg: MQARConfig, batch_size: int, *, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``index`` of the stream ``seed``: ``(tokens, labels)``, each ``(batch_size, cfg.seq_len)``."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))
    seq, answer = sequences(cfg, batch_size, g)
    labels = torch.where(answer[:, 1:], seq[:, 1:], torch.full_like(seq[:, 1:], IGNORE))
    return seq[:, :-1].contiguous(), labels


@torch.no_grad()
def accuracy(model, cfg: MQARConfig, *, num_batches: int, batch_size: int, seed: int, device=None,
             elastic=None) -> float:  # fmt: skip
    """Fraction of query positions where ``model``'s argmax is the paired value (fixed set by ``seed``)."""
    correct, total = 0, 0
    for i in range(num_batches):
        tokens, labels = batch(cfg, batch_size, seed=seed, index=i)
        tokens, labels = tokens.to(device), labels.to(device)
        logits = model(tokens) if elastic is None else model(tokens, elastic=elastic)
        asked = labels != IGNORE
        correct += int((logits.argmax(-1)[asked] == labels[asked]).sum())
        total += int(asked.sum())
    return correct / max(1, total)


class MixedLoader:
    """Interleaves a text loader with MQAR micro-batches: micro-batch ``n`` is MQAR when
    ``n % every == every - 1`` (``every=2``: half of them), else the next text micro-batch.

    Resumable like the text loader (``state_dict`` / ``load_state_dict`` carry both positions).
    MQAR micro-batches have their own length (``mqar.seq_len``); their labels ignore every
    position but the answers, so a plain LM loss on them trains recall only.
    """

    def __init__(self, text_loader, mqar: MQARConfig, *, every: int, micro_batch_size: int, seed: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"MQAR mix interval {every!r} is invalid; give an integer >= 1 (1 = only MQAR)")
        self.text, self.mqar, self.every = text_loader, mqar, every
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.count = 0  # micro-batches yielded so far
        self.mqar_batches = 0
        self.text_tokens = 0  # input tokens yielded, for the token accounting of a study
        self.mqar_tokens = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count
        self.count += 1
        if n % self.every == self.every - 1:
            self.mqar_batches += 1
            out = batch(self.mqar, self.micro_batch_size, seed=self.seed, index=self.mqar_batches - 1)
            self.mqar_tokens += out[0].numel()
            return out
        out = next(self.text)
        self.text_tokens += out[0].numel()
        return out

    def state_dict(self) -> dict:
        return {"text": self.text.state_dict(), "count": self.count, "mqar_batches": self.mqar_batches,
                "every": self.every, "seed": self.seed, "text_tokens": self.text_tokens,
                "mqar_tokens": self.mqar_tokens}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state.get("every") != self.every or state.get("seed") != self.seed:
            raise ConfigError("the saved MQAR mix has another interval or seed; resume with the same settings")
        self.text.load_state_dict(state["text"])
        self.count, self.mqar_batches = int(state["count"]), int(state["mqar_batches"])
        self.text_tokens, self.mqar_tokens = int(state.get("text_tokens", 0)), int(state.get("mqar_tokens", 0))
