"""Lookup-free quantization (Yu et al. 2023, MAGVIT-v2): each of `bits` channels becomes -1 or +1
by its sign; the index is the bits read as a binary number, channel 0 most significant:
    index = sum_i [z_i > 0] * 2^(bits - 1 - i)
No codebook to search or store: 2^bits codes cost nothing but the entropy loss.

Entropy loss, weighted by `entropy_weight`: the mean per-sample entropy of the soft code
assignment p(c | z) ~ softmax(-|z - c|^2 / t) minus `diversity_weight` times the entropy of its
batch mean. Low per-sample entropy makes each assignment confident; high batch entropy spreads
the batch over the codes.

Computed without materialising n x 2^bits. Over the codes {-1, +1}^bits, p(c | z) factorises
into independent bits, p(bit_i = 1 | z) = sigmoid(4 z_i / t), so the per-sample entropy is
exactly the sum of per-bit entropies. The batch mean does not factorise; it is computed exactly
within groups of at most `entropy_group_bits` bits (n x 2^group values, 2 x 512 per row for the
MAGVIT-v2 2^18 codebook instead of 262,144) and the group entropies summed. We chose factorised
groups over subsampling the codes: exact where the loss is computed, deterministic, memory
fixed by the group size whatever the codebook, and with every row of the batch in the mean.
What it gives up: dependence between groups (sum of group entropies >= the joint one), so it
spreads each group's sub-codes evenly rather than the full codes; the paper's 2^18 codebook is
commonly trained this way (two factorised 2^9 sub-codebooks).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from components.quantizers.base import QuantizerOutput, check_finite, check_last_dim, index_stats, projections
from components.quantizers.registry import QuantizerConfig, register


@register("lfq")
class LFQConfig(QuantizerConfig):
    type: Literal["lfq"] = "lfq"
    # A power of two up to 2^31: bits = log2(codebook_size) channels are quantized.
    codebook_size: int = Field(1024, ge=2)
    beta: float = Field(0.25, ge=0)
    entropy_weight: float = Field(0.1, ge=0)
    diversity_weight: float = Field(1.0, ge=0)
    # Temperature of the soft assignment the entropy is measured on.
    entropy_temperature: float = Field(0.01, gt=0)
    # Bits per factorised group of the batch entropy: memory n x 2^group_bits per group.
    entropy_group_bits: int = Field(9, ge=1, le=16)

    @field_validator("codebook_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two (bits = log2(codebook_size)), got {value}")
        if value > 2**31:
            raise ValueError(f"{value} codes is beyond 2^31 (indices must fit a uint32 token column)")
        return value

    @property
    def bits(self) -> int:
        return self.codebook_size.bit_length() - 1

    def latent_problems(self, latent_dim: int) -> list[tuple[str, str]]:
        if self.bits > latent_dim:
            return [
                ("codebook_size", f"2^{self.bits} codes need {self.bits} channels, more than latent_dim={latent_dim}")
            ]
        return []

    def build(self, dim: int) -> LFQ:
        self.check_latent(dim)
        return LFQ(self, dim)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp(min=1e-12)) + (1 - p) * torch.log((1 - p).clamp(min=1e-12)))


class LFQ(nn.Module):
    """Input (b, h, w, d) or (b, n, d); indices (b, h, w) or (b, n). With d != bits, a learned
    projection in and out."""

    index_dtype = torch.int64
    tokens_per_position = 1
    token_names = ("code",)

    def __init__(self, cfg: LFQConfig, dim: int):
        super().__init__()
        self.bits = bits = cfg.bits
        self.dim = dim
        self.codebook_size = 2**bits
        self.beta = cfg.beta
        self.entropy_weight = cfg.entropy_weight
        self.diversity_weight = cfg.diversity_weight
        self.entropy_temperature = cfg.entropy_temperature
        self.entropy_group_bits = cfg.entropy_group_bits
        self.register_buffer("powers", 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.long), persistent=False)
        self.project_in, self.project_out = projections(dim, bits)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., d)"""
        on = (indices.unsqueeze(-1) // self.powers) % 2
        return self.project_out(on.float() * 2.0 - 1.0)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim)
        flat = z.reshape(-1, self.dim).float()
        if self.training:
            check_finite(flat)
        h = self.project_in(flat)
        on = h > 0
        indices = (on.long() * self.powers).sum(dim=-1)
        signs = on.float() * 2.0 - 1.0
        loss = self.beta * F.mse_loss(h, signs)
        if self.training and self.entropy_weight > 0:
            loss = loss + self.entropy_weight * self.entropy_loss(h)
        # Forward: exactly +-1; backward: the identity (straight-through).
        quantized = self.project_out(signs + (h - h.detach())).view_as(z).to(z.dtype)
        stats = index_stats(indices, self.codebook_size, reduce=self.training)
        return QuantizerOutput(quantized, indices.view(z.shape[:-1]), loss, stats)

    def entropy_loss(self, h: torch.Tensor) -> torch.Tensor:
        """(n, bits) -> per-sample entropy - diversity_weight * batch entropy, in nats; memory
        n x 2^entropy_group_bits per group, never n x 2^bits."""
        logits = 4.0 * h / self.entropy_temperature  # log-odds of bit = +1
        per_sample = _binary_entropy(torch.sigmoid(logits)).sum(dim=1).mean()
        batch = h.new_zeros(())
        for group in logits.split(self.entropy_group_bits, dim=1):
            batch = batch + self._group_batch_entropy(group)
        return per_sample - self.diversity_weight * batch

    @staticmethod
    def _group_batch_entropy(logits: torch.Tensor) -> torch.Tensor:
        """(n, g) per-bit log-odds -> entropy of the batch-mean distribution over the 2^g
        sub-codes of the group, exactly."""
        g = logits.shape[1]
        codes = (
            torch.arange(2**g, device=logits.device).unsqueeze(1) >> torch.arange(g - 1, -1, -1, device=logits.device)
        ) & 1
        log_on, log_off = F.logsigmoid(logits), F.logsigmoid(-logits)
        # log p(sub-code) = sum over its bits of log p(bit): (n, 2^g) by two matmuls.
        log_probs = log_on @ codes.t().float() + log_off @ (1 - codes).t().float()
        mean = log_probs.exp().mean(dim=0)
        return -(mean * torch.log(mean.clamp(min=1e-12))).sum()
