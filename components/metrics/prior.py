"""How well a prior predicts tokens: mean bits per token (a MaskGIT prior: per hidden token,
for the fixed validation masks of components/priors/maskgit.py; not a likelihood)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.priors.maskgit import MaskGITPrior, validation_masks
from components.priors.transformer import TransformerPrior


def bits_per_token(
    model: TransformerPrior, tokens: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256
) -> float:
    """Mean negative log2-likelihood per token of (n, L) `tokens` under the prior."""
    batches = (
        (tokens[i : i + batch_size], labels[i : i + batch_size] if labels is not None else None)
        for i in range(0, tokens.shape[0], batch_size)
    )
    return PriorBits(model).add_all(batches).bits


class PriorBits:
    """Bits per token of a stream of (tokens (b, L), labels (b,) or None) batches under the
    prior, accumulated a batch at a time: memory holds one batch. A MaskGIT prior's: bits per
    hidden token, row r of the stream hidden by its own fixed mask."""

    def __init__(self, model: TransformerPrior):
        self.model = model
        self.total, self.count, self.rows = 0.0, 0, 0

    @torch.no_grad()
    def add(self, tokens: torch.Tensor, labels: torch.Tensor | None) -> None:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        batch = tokens.to(device)
        labels = labels.to(device) if labels is not None else None
        if isinstance(model, MaskGITPrior):
            hidden = validation_masks(self.rows, batch.shape[0], batch.shape[1]).to(device)
            self.total += model.masked_nll(batch, labels, hidden).item()
            self.count += int(hidden.sum())
        else:
            logits = model(batch, labels)
            self.total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch.reshape(-1), reduction="sum"
            ).item()
            self.count += batch.numel()
        self.rows += batch.shape[0]
        model.train(was_training)

    def add_all(self, batches) -> PriorBits:
        for tokens, labels in batches:
            self.add(tokens, labels)
        return self

    @property
    def bits(self) -> float:
        return self.total / max(self.count, 1) / math.log(2)
