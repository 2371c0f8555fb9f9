"""Codebook statistics over a set of token indices."""

from __future__ import annotations

import math
from collections import Counter
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


def _column_stats(counts: np.ndarray, codebook_size: int) -> tuple[float, float]:
    """(usage %, entropy in nats) of one column's counts of the codes it used."""
    counts = counts[counts > 0]
    if counts.sum() == 0:
        return 0.0, 0.0
    probs = counts / counts.sum()
    return len(counts) / codebook_size * 100.0, float(-(probs * np.log(probs)).sum())


class CodeCounts:
    """How often each code occurs, per token column, accumulated a batch at a time: dense
    counts up to DENSE_LIMIT codes, the used codes only past that. Memory: the counts, never
    the tokens."""

    def __init__(self, codebook_sizes: Mapping[str, int]):
        self.sizes = dict(codebook_sizes)
        self.dense = {n: np.zeros(k, dtype=np.int64) for n, k in self.sizes.items() if k <= DENSE_LIMIT}
        self.sparse: dict[str, Counter] = {n: Counter() for n, k in self.sizes.items() if k > DENSE_LIMIT}
        self.per_row: dict[str, int] = {}  # tokens per image of each column

    def add(self, columns: Mapping[str, np.ndarray]) -> CodeCounts:
        """columns: token column -> (b, L_c) tokens."""
        for name, tokens in columns.items():
            tokens = np.asarray(tokens)
            if tokens.size == 0:
                continue
            self.per_row[name] = tokens.shape[1] if tokens.ndim == 2 else 1
            if name in self.dense:
                self.dense[name] += np.bincount(tokens.reshape(-1), minlength=self.sizes[name])[: self.sizes[name]]
            else:
                codes, counts = used_code_counts(tokens)
                self.sparse[name].update(dict(zip(codes.tolist(), counts.tolist(), strict=True)))
        return self

    def used(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(codes, counts) of the codes column `name` used."""
        if name in self.dense:
            codes = np.flatnonzero(self.dense[name])
            return codes, self.dense[name][codes]
        items = sorted(self.sparse[name].items())
        return np.array([c for c, _ in items], dtype=np.int64), np.array([n for _, n in items], dtype=np.int64)

    def all_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes, counts) summed over every column (the codebook usage plot)."""
        total: Counter = Counter()
        for name in self.sizes:
            codes, counts = self.used(name)
            total.update(dict(zip(codes.tolist(), counts.tolist(), strict=True)))
        items = sorted(total.items())
        return np.array([c for c, _ in items], dtype=np.int64), np.array([n for _, n in items], dtype=np.int64)

    def stats(self) -> dict[str, float]:
        """Usage (% of codes that appear), perplexity (exp entropy, in codes) and the unigram
        entropy in bits per token: the cost of coding the tokens by frequency alone.

        Each column (a product group, residual stage or hierarchical tier) is its own
        distribution over its own codebook: usage and perplexity are the columns' means, and
        the unigram entropy is what coding each column by its own frequencies costs per token,
        weighted by the column's tokens per image (the baseline a prior that knows the position
        must beat)."""
        seen = [name for name in self.sizes if name in self.per_row]
        if not seen:
            return {"codebook_usage": 0.0, "perplexity": 0.0, "unigram_bits_per_token": 0.0}
        usage, entropy = zip(*(_column_stats(self.used(n)[1], self.sizes[n]) for n in seen), strict=True)
        return {
            "codebook_usage": float(np.mean(usage)),
            "perplexity": float(np.mean([math.exp(e) for e in entropy])),
            "unigram_bits_per_token": float(np.average(entropy, weights=[self.per_row[n] for n in seen])) / math.log(2),
        }


def codebook_stats(columns: Mapping[str, np.ndarray], codebook_sizes: Mapping[str, int]) -> dict[str, float]:
    """`CodeCounts.stats` of token columns in memory: column -> (n, L_c) tokens (`TokenData.column`)."""
    return CodeCounts(codebook_sizes).add(columns).stats()
