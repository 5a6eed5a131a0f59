"""Packed fixed-length training samples and a deterministic, shardable, resumable loader.

:class:`PackedDataset` lays the documents of an indexed dataset end to end into one token stream
(inserting the EOD after any document that does not already end with it, when ``eod_id`` is
given) and cuts it into windows of ``seq_len + 1`` tokens with stride ``seq_len``: sample ``i`` is
``stream[i*seq_len : (i+1)*seq_len + 1]``, and ``(tokens, labels) = (window[:-1], window[1:])``.
So every token of the stream except the first is a label exactly once; the tail that does not fill
a window is dropped.

:class:`PackedLoader` walks the samples in epochs. Epoch ``e`` visits them in the order of a
permutation drawn from ``numpy.random.default_rng([seed, e])`` (or in order with
``shuffle=False``). Each global batch is ``global_batch_size`` consecutive entries of that order,
taken as ``grad_accum = global / (micro * dp_world_size)`` micro-steps; in each micro-step rank
``r`` gets entries ``[r*micro, (r+1)*micro)`` of the step's ``micro * dp_world_size`` entries (the
layout of Megatron's pretraining sampler). So the ranks' micro-batches of one global batch are
disjoint and together are exactly that global batch. The samples after the last whole global
batch of an epoch are not used in that epoch.

The loader's position is ``(epoch, samples_in_epoch)`` (global samples, all ranks together):
``state_dict()`` saves it and ``load_state_dict()`` continues at exactly the next micro-batch.
Because the position is counted in global samples, a run may resume with another data-parallel
size as long as it stopped at a global-batch boundary.

:func:`unigram_entropy` is the loss (nats/token) of the best model that ignores context, the
baseline that a validation loss should beat.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_elastic.data.indexed import IndexedTokens
from megatron_elastic.errors import ConfigError, UserError

STATE_FORMAT = 1


class PackedDataset:
    """Windows of ``seq_len + 1`` tokens over the concatenated documents of ``prefix``."""

    def __init__(self, prefix: str | os.PathLike | IndexedTokens, seq_len: int, *, eod_id: int | None = None):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"seq_len must be a positive integer (got {seq_len!r}); pass e.g. --seq-len 512")
        self.data = prefix if isinstance(prefix, IndexedTokens) else IndexedTokens(prefix)
        self.seq_len = seq_len
        self.eod_id = eod_id
        sizes = self.data.sizes.astype(np.int64)
        starts = self.data.pointers // self.data.dtype.itemsize
        if eod_id is None:
            extra = np.zeros(len(sizes), dtype=np.int64)
        else:
            # The last token of every document, gathered at once (an empty document gets an EOD too).
            last = np.full(len(sizes), -1, dtype=np.int64)
            nonempty = sizes > 0
            last[nonempty] = self.data.tokens[(starts + sizes - 1)[nonempty]]
            extra = (last != eod_id).astype(np.int64)
        self._extra = extra
        self._starts = starts
        self._sizes = sizes
        self._vends = np.cumsum(sizes + extra)  # exclusive end of each document in the stream
        self.num_tokens = int(self._vends[-1]) if len(sizes) else 0
        self.inserted_eods = int(extra.sum())
        # Without insertions a contiguous file *is* the stream: one slice per sample.
        self._flat = self.data.contiguous and self.inserted_eods == 0
        self.num_samples = max(self.num_tokens - 1, 0) // seq_len
        if self.num_samples == 0:
            raise UserError(
                f"dataset {self.data.prefix!r} has {self.num_tokens} tokens, too few for one sample of "
                f"seq_len {seq_len} (+1); use a smaller seq_len or more data"
            )

    def __len__(self) -> int:
        return self.num_samples

    def window(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens of the stream from position ``start``, as int64."""
        if self._flat:
            return np.asarray(self.data.tokens[start : start + length], dtype=np.int64)
        out = np.empty(length, dtype=np.int64)
        doc = int(np.searchsorted(self._vends, start, side="right"))
        pos, filled = start, 0
        while filled < length:
            vstart = int(self._vends[doc - 1]) if doc else 0
            offset = pos - vstart
            size = int(self._sizes[doc])
            if offset < size:
                n = min(size - offset, length - filled)
                s = int(self._starts[doc]) + offset
                out[filled : filled + n] = self.data.tokens[s : s + n]
            else:  # the inserted EOD after this document
                n = 1
                out[filled] = self.eod_id
            filled += n
            pos += n
            while doc < len(self._vends) and pos >= int(self._vends[doc]):  # also skips empty documents
                doc += 1
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        i = range(self.num_samples)[i]
        return self.window(i * self.seq_len, self.seq_len + 1)

    def unigram_counts(self, vocab_size: int | None = None) -> np.ndarray:
        """How often each token id occurs in the stream (inserted EODs included)."""
        tokens = self.data.tokens
        top = int(vocab_size) if vocab_size else 0
        counts = np.zeros(top, dtype=np.int64)
        step = 1 << 24  # bounded memory on large files
        for s in range(0, len(tokens), step):
            c = np.bincount(np.asarray(tokens[s : s + step]).astype(np.int64), minlength=len(counts))
            if len(c) > len(counts):
                counts = np.pad(counts, (0, len(c) - len(counts)))
            counts[: len(c)] += c
        if self.inserted_eods:
            if self.eod_id >= len(counts):
                counts = np.pad(counts, (0, self.eod_id + 1 - len(counts)))
            counts[self.eod_id] += self.inserted_eods
        return counts


def _entropy_nats(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_entropy(source: str | os.PathLike | PackedDataset, *, eod_id: int | None = None) -> float:
    """Entropy (nats/token) of the token frequencies of a dataset split.

    This is the loss of the best context-free model fitted on that same split: a validation loss
    at or above it means the model has learned nothing beyond token frequencies.
    """
    ds = source if isinstance(source, PackedDataset) else PackedDataset(source, 1, eod_id=eod_id)
    return _entropy_nats(ds.unigram_counts())


def unigram_cross_entropy(
    eval_source: str | os.PathLike | PackedDataset,
    fit_source: str | os.PathLike | PackedDataset,
    *,
    vocab_size: int,
    eod_id: int | None = None,
    alpha: float = 1.0,
) -> float:
    """Loss (nats/token) on ``eval_source`` of a unigram model fitted on ``fit_source`` (add-``alpha``)."""
    ev = eval_source if isinstance(eval_source, PackedDataset) else PackedDataset(eval_source, 1, eod_id=eod_id)
    fit = fit_source if isinstance(fit_source, PackedDataset) else PackedDataset(fit_source, 1, eod_id=eod_id)
    ce, cf = ev.unigram_counts(vocab_size), fit.unigram_counts(vocab_size)
    if len(ce) > vocab_size or len(cf) > vocab_size:
        raise UserError(f"the datasets hold token ids >= vocab_size {vocab_size}; pass the tokenizer's vocabulary size")
    q = (cf + alpha) / (cf.sum() + alpha * vocab_size)
    return float(-(ce * np.log(q)).sum() / ce.sum())


class PackedLoader:
    """Micro-batches ``(tokens, labels)`` of shape ``(micro_batch_size, seq_len)`` for one data-parallel rank."""

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        micro_batch_size: int,
        global_batch_size: int | None = None,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        max_epochs: int | None = None,
    ):
        if micro_batch_size < 1:
            raise ConfigError(
                f"micro_batch_size must be >= 1 (got {micro_batch_size}); pass a positive micro batch size"
            )
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ConfigError(
                f"dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size}); check the launcher's rank settings"
            )
        step = micro_batch_size * dp_world_size
        if global_batch_size is None:
            global_batch_size = step
        if global_batch_size < step or global_batch_size % step:
            raise ConfigError(
                f"global_batch_size {global_batch_size} is not a positive multiple of micro_batch_size * dp_world_size "
                f"= {micro_batch_size} * {dp_world_size} = {step}; change one of them"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.grad_accum_steps = global_batch_size // step
        self.seed, self.shuffle, self.max_epochs = int(seed), shuffle, max_epochs
        self.batches_per_epoch = len(dataset) // global_batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"dataset {dataset.data.prefix!r} has {len(dataset)} samples of {dataset.seq_len} tokens, fewer than one "
                f"global batch of {global_batch_size}; use a smaller global batch or seq_len, or more data"
            )
        self.epoch = 0
        self.samples_in_epoch = 0
        self._order_epoch, self._order = None, None

    # ------------------------------------------------------------------ order and position
    def order(self, epoch: int) -> np.ndarray:
        """The sample order of one epoch (the same on every rank)."""
        if self._order_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    @property
    def _step(self) -> int:
        return self.micro_batch_size * self.dp_world_size

    @property
    def samples_per_epoch(self) -> int:
        return self.batches_per_epoch * self.global_batch_size

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed since the start, all ranks together."""
        return self.epoch * self.samples_per_epoch + self.samples_in_epoch

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank."""
        return self.batches_per_epoch * self.grad_accum_steps

    def __iter__(self):
        return self

    def _next_position(self) -> tuple[int, int]:
        """(epoch, samples_in_epoch) where the next micro-step starts."""
        if self.samples_in_epoch >= self.samples_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.samples_in_epoch

    def sample_indices(self) -> np.ndarray:
        """The dataset indices of the micro-batch the next ``__next__`` returns (position unchanged)."""
        epoch, pos = self._next_position()
        first = pos + self.dp_rank * self.micro_batch_size
        return self.order(epoch)[first : first + self.micro_batch_size].copy()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = self._next_position()
        if self.max_epochs is not None and epoch >= self.max_epochs:
            raise StopIteration
        indices = self.sample_indices()
        windows = torch.from_numpy(np.stack([self.dataset[int(i)] for i in indices]))
        self.epoch, self.samples_in_epoch = epoch, pos + self._step
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": len(self.dataset),
            "seq_len": self.dataset.seq_len,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: the next micro-batch is the one an uninterrupted run would yield."""
        try:
            epoch, pos = int(state["epoch"]), int(state["samples_in_epoch"])
            saved = {k: state[k] for k in ("seed", "shuffle", "num_samples", "seq_len", "global_batch_size")}
        except (KeyError, TypeError, ValueError):
            raise UserError(
                "data loader state is incomplete; resume from a checkpoint written by this version"
            ) from None
        ours = {"seed": self.seed, "shuffle": self.shuffle, "num_samples": len(self.dataset),
                "seq_len": self.dataset.seq_len, "global_batch_size": self.global_batch_size}  # fmt: skip
        diff = [f"{k} {saved[k]} != {ours[k]}" for k in ours if saved[k] != ours[k]]
        if diff:
            raise UserError(
                f"data loader state was saved for other settings ({', '.join(diff)}); resume with the same data, "
                "seq_len, seed and global batch size, or start the data from scratch"
            )
        if epoch < 0 or not 0 <= pos <= self.samples_per_epoch or pos % self._step:
            raise UserError(
                f"data loader state position {pos} (epoch {epoch}) is not a whole micro-step of "
                f"micro_batch_size * dp_world_size = {self._step}; resume at a global-batch boundary or with the saved layout"
            )
        self.epoch, self.samples_in_epoch = epoch, pos
