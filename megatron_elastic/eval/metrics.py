"""What one model costs and how good it is: loss and bits per byte, inference memory, CPU latency.

Bits per byte make losses comparable across tokenizers and domains: a tokenizer trained on Python
source splits English prose into more tokens per byte, so nats/token alone would flatter or punish
a domain for its tokenization. ``bpb = (sum of token losses in nats) / (ln 2 * bytes of the text
those tokens spell)``, where the bytes of a token are the raw bytes it stands for (see
:func:`token_byte_lengths`).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from megatron_elastic.distill.losses import cross_entropy
from megatron_elastic.model.config import ATTENTION, MAMBA, HybridConfig


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's): printable Latin-1 bytes
    map to themselves, the other 68 to code points from 256 upwards in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_byte_lengths(tokenizer) -> np.ndarray:
    """Bytes of text each token id stands for (special tokens: 0).

    Byte-level BPE (the built-in tokenizer): every character of the token's string is one byte.
    Other tokenizers: the UTF-8 length of the token decoded on its own (exact for whole characters).
    """
    tok = tokenizer._tok
    n = tokenizer.vocab_size
    spec = json.loads(tok.to_str())
    special = {int(t["id"]) for t in spec.get("added_tokens") or [] if t.get("special")}
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
    alphabet = set(_bytes_to_unicode().values())
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if i in special:
            continue
        s = tok.id_to_token(i)
        if s is None:
            continue
        if byte_level and all(c in alphabet for c in s):
            out[i] = len(s)
        else:
            out[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return out


@torch.no_grad()
def loss_and_bpb(model, batches, byte_lengths: np.ndarray, *, device=None) -> dict[str, float]:
    """Mean next-token loss (nats/token) over every label of ``batches`` and bits per byte."""
    total, count, nbytes = 0.0, 0, 0
    lengths = torch.from_numpy(byte_lengths)
    for tokens, labels in batches:
        logits = model(tokens.to(device))
        total += cross_entropy(logits, labels.to(device), reduction="sum").item()
        count += labels.numel()
        nbytes += int(lengths[labels.clamp(0, len(lengths) - 1)].sum())
    loss = total / max(1, count)
    return {"loss": loss, "bpb": total / (math.log(2) * max(1, nbytes)), "tokens": count, "bytes": nbytes}


def inference_memory(config: HybridConfig, *, context: int, batch: int = 1, bytes_per_element: int = 2) -> dict[str, int]:
    """Bytes to serve ``batch`` sequences of ``context`` tokens (the formula of
    :func:`megatron_elastic.elastic.costs.memory`, here for any config, per-layer sizes included):
    weights; per attention layer the KV cache ``2 * kv_heads * head_dim * context``; per Mamba layer
    the conv state ``(H*P + 2*G*N) * (kernel - 1)`` and the SSM state ``H*P*N``; caches times batch."""
    from megatron_elastic.model.config import num_parameters

    c = config
    weights = sum(num_parameters(c).values())
    kv, state = 0, 0
    for i, kind in enumerate(c.layer_types):
        d = c.layer_dims(i)
        if kind == ATTENTION:
            kv += 2 * c.num_query_groups * c.head_dim * context
        elif kind == MAMBA:
            di = d.mamba_num_heads * d.mamba_head_dim
            state += (di + 2 * c.mamba_num_groups * c.mamba_state_dim) * (c.mamba_conv_kernel - 1) + di * c.mamba_state_dim
    caches = (kv + state) * batch
    return {"weights": weights * bytes_per_element, "kv_cache": kv * batch * bytes_per_element,
            "mamba_state": state * batch * bytes_per_element, "total": (weights + caches) * bytes_per_element}  # fmt: skip


@torch.no_grad()
def latencies_ms(models: list, tokens: torch.Tensor, *, repeats: int = 5) -> list[float]:
    """Fastest forward time of each model on ``tokens`` over ``repeats`` rounds, in ms. Models are
    timed interleaved (one run of each per round, after a warm-up round) and the minimum is kept:
    on a shared machine other processes only ever add time, so the fastest run is the closest to
    the model's own cost."""
    for m in models:
        m(tokens)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            start = time.perf_counter()
            m(tokens)
            times[i].append(time.perf_counter() - start)
    return [1000 * min(t) for t in times]
