"""How well a prior predicts tokens: mean bits per token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.priors.transformer import TransformerPrior


@torch.no_grad()
def bits_per_token(
    model: TransformerPrior, tokens: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256
) -> float:
    """Mean negative log2-likelihood per token of (n, L) `tokens` under the prior."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        batch_labels = labels[start : start + batch_size].to(device) if labels is not None else None
        logits = model(batch, batch_labels)
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch.reshape(-1), reduction="sum"
        ).item()
        count += batch.numel()
    model.train(was_training)
    return total / max(count, 1) / math.log(2)
