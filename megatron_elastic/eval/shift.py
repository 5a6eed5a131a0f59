"""The shifted domain: English prose from the machine's own license texts.

The built-in corpus is Python source code. The shifted domain is the plain-text licenses under
``/usr/share/common-licenses`` (GPL, LGPL, Apache-2.0, MPL, Artistic, BSD, CC0, GFDL). Debian's
``base-files`` package, which every Debian and Ubuntu system has (it is essential: it cannot be
removed), installs them, so the text is on the machine without a download. It is a real shift:
long English legal prose with no code syntax, indentation or identifiers, a vocabulary the
tokenizer (trained on Python) compresses poorly, and nothing of it in the training data.

Files are read in name order; symbolic links (``GPL`` -> ``GPL-3`` and so on) and files whose
real path was already read are skipped, so every text counts once. Each file is one document:
encoded, followed by the end-of-document token, concatenated, and cut into windows of
``seq_len + 1`` tokens with stride ``seq_len`` (as :class:`megatron_elastic.data.loader.PackedDataset`
does), taken in order.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_elastic.errors import UserError

DEFAULT_SHIFT_DIR = "/usr/share/common-licenses"


def shift_files(path: str | os.PathLike) -> list[Path]:
    """The text files of the shifted domain (a directory of files, or one file)."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"shifted-domain text {str(root)!r} does not exist (Debian's base-files installs "
                        f"{DEFAULT_SHIFT_DIR}); give another directory of plain-text files or drop the 'shift' task")  # fmt: skip
    seen, files = set(), []
    for p in sorted(root.iterdir()):
        if p.is_symlink() or not p.is_file():
            continue
        real = p.resolve()
        if real in seen:
            continue
        seen.add(real)
        files.append(p)
    if not files:
        raise UserError(f"shifted-domain directory {str(root)!r} holds no regular files; give a directory of "
                        "plain-text files or drop the 'shift' task")  # fmt: skip
    return files


def shift_batches(path: str | os.PathLike, tokenizer, *, seq_len: int, batch_size: int,
                  num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Up to ``num_batches`` micro-batches ``(tokens, labels)`` of the shifted domain, in file order."""
    stream: list[int] = []
    for p in shift_files(path):
        text = p.read_bytes().decode("utf-8", errors="replace")
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eod_id)
    windows = (len(stream) - 1) // seq_len
    if windows < batch_size:
        raise UserError(f"shifted-domain text {str(path)!r} gives {len(stream)} tokens, fewer than one batch of "
                        f"{batch_size} x {seq_len}; give more text or a smaller batch")  # fmt: skip
    data = torch.tensor(stream, dtype=torch.int64)
    out = []
    for b in range(min(num_batches, windows // batch_size)):
        rows = [data[(b * batch_size + r) * seq_len : (b * batch_size + r + 1) * seq_len + 1] for r in range(batch_size)]
        w = torch.stack(rows)
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out
