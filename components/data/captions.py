"""Captions as a text-conditional prior reads them: UTF-8 bytes (the byte vocabulary of
`vqpipe export`: id = byte value, 256 ids), cut to the prior's `text_len` slots and
right-aligned after pads (-1), so the caption's last byte is always just before boi.

    ids = caption_matrix(["a red circle on a white background", None], 64)   # (2, 64) int64

A missing or empty caption is all pads: the unconditional input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

TEXT_VOCAB = 256  # UTF-8 bytes


def caption_bytes(caption: str | None, length: int) -> bytes:
    """The bytes a prior with `length` caption slots reads of `caption`: its first `length`."""
    return (caption or "").encode("utf-8")[:length]


def caption_matrix(captions: Sequence[str | None], length: int) -> torch.Tensor:
    """(n, length) int64: each caption's UTF-8 bytes (cut to `length`), right-aligned, -1 before."""
    out = np.full((len(captions), length), -1, dtype=np.int64)
    for row, caption in enumerate(captions):
        data = caption_bytes(caption, length)
        if data:
            out[row, length - len(data) :] = np.frombuffer(data, dtype=np.uint8)
    return torch.from_numpy(out)


def caption_text(ids: torch.Tensor) -> str:
    """One row of `caption_matrix` back to its text (pads dropped; a cut character replaced)."""
    kept = ids[ids >= 0].to(torch.uint8).cpu().numpy()
    return bytes(kept).decode("utf-8", errors="replace")
