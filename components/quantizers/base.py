"""What every quantizer returns, and helpers they share."""

from __future__ import annotations

from typing import NamedTuple

import torch


class QuantizerOutput(NamedTuple):
    """quantized: same shape as the input, straight-through to it in training.
    indices: input shape without the last dim, int64 in [0, codebook_size).
    loss: scalar to add to the training loss.
    stats: detached scalars for logging (`codebook_usage` in %, `perplexity`)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def usage_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """From per-code counts (k,): share of the codebook used (%) and perplexity (exp of the
    code-distribution entropy)."""
    counts = counts.float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return {
        "codebook_usage": (counts > 0).float().mean() * 100.0,
        "perplexity": torch.exp(entropy),
    }


def check_finite(z: torch.Tensor, what: str = "encoder output") -> None:
    """A NaN would silently poison an EMA codebook for good: stop at the step it appears."""
    if not torch.isfinite(z).all():
        bad = (~torch.isfinite(z)).sum().item()
        raise FloatingPointError(f"{what} has {bad} non-finite values (NaN/inf); refusing to quantize")
