"""Codebook statistics over a set of token indices."""

from __future__ import annotations

import math

import numpy as np


def code_counts(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens).reshape(-1), minlength=codebook_size)[:codebook_size]


def codebook_stats(tokens: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Usage (% of codes that appear), perplexity (exp entropy, in codes) and the unigram
    entropy in bits per token: the cost of coding the tokens by frequency alone."""
    counts = code_counts(tokens, codebook_size).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return {"codebook_usage": 0.0, "perplexity": 0.0, "unigram_bits_per_token": 0.0}
    probs = counts[counts > 0] / total
    entropy = float(-(probs * np.log(probs)).sum())
    return {
        "codebook_usage": float((counts > 0).mean() * 100.0),
        "perplexity": math.exp(entropy),
        "unigram_bits_per_token": entropy / math.log(2),
    }
