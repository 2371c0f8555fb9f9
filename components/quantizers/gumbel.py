"""Gumbel-softmax quantization (Jang et al. 2017; as in DALL-E's dVAE): the encoder output is
projected to logits over the K codes; training samples a relaxed one-hot with Gumbel noise at a
temperature annealed from `temperature_start` to `temperature_end` over `anneal_steps`, and a
KL term to the uniform prior keeps every code in play. Eval takes the argmax: deterministic.

With `straight_through` (default) the forward value is the sampled code itself (so
`indices_to_codes(indices) == quantized` in training too) and the gradient goes through the
relaxed mixture of codes; without it the forward value is the mixture. The relaxation needs the
n x K logits and their gradient: unlike nearest-code search that is the method itself, so its
memory grows with the codebook (see benchmarks/quantizers.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from components.quantizers.base import QuantizerOutput, check_finite, check_last_dim, index_stats
from components.quantizers.registry import QuantizerConfig, register


@register("gumbel")
class GumbelConfig(QuantizerConfig):
    type: Literal["gumbel"] = "gumbel"
    codebook_size: int = Field(128, ge=2, le=2**24)
    # DALL-E anneals from 1 to 1/16; a short run needs a shorter schedule, not a lower floor.
    temperature_start: float = Field(1.0, gt=0)
    temperature_end: float = Field(0.0625, gt=0)
    anneal_steps: int = Field(1000, ge=1)
    kl_weight: float = Field(5e-4, ge=0)
    straight_through: bool = True

    @model_validator(mode="after")
    def _cooling(self) -> GumbelConfig:
        if self.temperature_end > self.temperature_start:
            raise ValueError(
                f"temperature_end ({self.temperature_end}) must not exceed temperature_start ({self.temperature_start})"
            )
        return self

    def build(self, dim: int) -> GumbelQuantizer:
        return GumbelQuantizer(self, dim)


def _gumbel_softmax(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax((logits + g) / tau), g ~ Gumbel(0, 1) drawn as -log(-log(u)) in one buffer:
    at n x K = 8192 x 16384 each fresh buffer costs more than the arithmetic, and uniform
    draws are ~7x cheaper than the exponential ones F.gumbel_softmax takes."""
    noise = torch.empty_like(logits).uniform_(torch.finfo(logits.dtype).tiny, 1.0)
    noise.log_().neg_().log_().neg_()
    return torch.softmax(noise.add_(logits).div_(tau), dim=-1)


class GumbelQuantizer(nn.Module):
    """Input (b, h, w, d) or (b, n, d); indices (b, h, w) or (b, n)."""

    index_dtype = torch.int64
    tokens_per_position = 1
    token_names = ("code",)

    def __init__(self, cfg: GumbelConfig, dim: int):
        super().__init__()
        codebook_size = cfg.codebook_size
        self.codebook_size = codebook_size
        self.dim = dim
        self.temperature_start = cfg.temperature_start
        self.temperature_end = cfg.temperature_end
        self.anneal_steps = cfg.anneal_steps
        self.kl_weight = cfg.kl_weight
        self.straight_through = cfg.straight_through
        self.to_logits = nn.Linear(dim, codebook_size)
        self.codebook = nn.Embedding(codebook_size, dim)
        # Training steps taken: the temperature schedule's clock, saved with the weights.
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        # While a step's micro-batches pass: the clock moves once, when the step ends.
        self._deferred: bool | None = None

    def begin_deferred(self) -> None:
        self._deferred = False

    def finish_deferred(self, apply: bool = True) -> None:
        if apply and self._deferred:
            self.step.add_(1)
        self._deferred = None

    def temperature(self) -> float:
        """Geometric from start to end over anneal_steps, then constant."""
        progress = min(int(self.step) / self.anneal_steps, 1.0)
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** progress

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., d)"""
        return self.codebook(indices)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim)
        flat = z.reshape(-1, self.dim).float()
        logits = self.to_logits(flat)
        stats: dict[str, torch.Tensor] = {}
        if self.training:
            check_finite(flat)
            tau = self.temperature()
            if self._deferred is None:
                self.step.add_(1)
            else:
                self._deferred = True
            soft = _gumbel_softmax(logits, tau)
            indices = soft.argmax(dim=-1)
            if self.straight_through:
                # The sampled code forward; the relaxed mixture's gradient backward (to the
                # logits; the codebook learns through the chosen code, as with a hard one-hot).
                mixture = soft @ self.codebook.weight.detach()
                quantized = self.codebook(indices) + (mixture - mixture.detach())
            else:
                quantized = soft @ self.codebook.weight
            log_probs = F.log_softmax(logits, dim=-1)
            # KL(q || uniform) = sum q log q + log K, per position.
            kl = (log_probs.exp() * log_probs).sum(dim=-1).mean() + math.log(self.codebook_size)
            loss = self.kl_weight * kl
            stats["temperature"] = torch.tensor(tau)
        else:
            indices = logits.argmax(dim=-1)
            quantized = self.codebook(indices)
            loss = flat.new_zeros(())
        stats.update(index_stats(indices, self.codebook_size, reduce=self.training))
        return QuantizerOutput(quantized.view_as(z).to(z.dtype), indices.view(z.shape[:-1]), loss, stats)
