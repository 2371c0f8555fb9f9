"""Codebook statistics over a set of token indices."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# Past this many codes counts are kept sparse (used codes only): LFQ/FSQ may have 2^31.
DENSE_LIMIT = 1 << 20


def code_counts(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    """(codebook_size,) occurrences of each code; for codebooks past DENSE_LIMIT use
    `used_code_counts`."""
    if codebook_size > DENSE_LIMIT:
        raise ValueError(f"a dense count of {codebook_size} codes is too large; use used_code_counts")
    return np.bincount(np.asarray(tokens).reshape(-1), minlength=codebook_size)[:codebook_size]


def used_code_counts(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, counts) of the codes that occur, for any codebook size."""
    return np.unique(np.asarray(tokens).reshape(-1), return_counts=True)


def _column_stats(tokens: np.ndarray, codebook_size: int) -> tuple[float, float]:
    """(usage %, entropy in nats) of one token column."""
    _, counts = used_code_counts(tokens)
    if counts.sum() == 0:
        return 0.0, 0.0
    probs = counts / counts.sum()
    return len(counts) / codebook_size * 100.0, float(-(probs * np.log(probs)).sum())


def codebook_stats(columns: Mapping[str, np.ndarray], codebook_sizes: Mapping[str, int]) -> dict[str, float]:
    """Usage (% of codes that appear), perplexity (exp entropy, in codes) and the unigram
    entropy in bits per token: the cost of coding the tokens by frequency alone.

    columns: token column -> (n, L_c) tokens (`TokenData.column`). Each column (a product
    group, residual stage or hierarchical tier) is its own distribution over its own codebook:
    usage and perplexity are the columns' means, and the unigram entropy is what coding each
    column by its own frequencies costs per token, weighted by the column's tokens per image
    (the baseline a prior that knows the position must beat)."""
    stats, weights = [], []
    for name, tokens in columns.items():
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            continue
        stats.append(_column_stats(tokens, codebook_sizes[name]))
        weights.append(tokens.shape[1] if tokens.ndim == 2 else 1)
    if not stats:
        return {"codebook_usage": 0.0, "perplexity": 0.0, "unigram_bits_per_token": 0.0}
    usage, entropy = zip(*stats, strict=True)
    return {
        "codebook_usage": float(np.mean(usage)),
        "perplexity": float(np.mean([math.exp(e) for e in entropy])),
        "unigram_bits_per_token": float(np.average(entropy, weights=weights)) / math.log(2),
    }
