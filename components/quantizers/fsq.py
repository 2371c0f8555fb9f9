"""Finite scalar quantization (Mentzer et al. 2023): each of a few channels is bounded with tanh
and rounded to one of `levels[i]` values (straight-through). The codebook is the grid itself:
prod(levels) codes, no parameters, nothing to collapse, no auxiliary loss.

Index of a code: mixed radix over the channels, channel 0 least significant:
    index = sum_i digit_i * prod(levels[:i]),   digit_i in [0, levels[i])
Code values are digit_i - levels[i] // 2, scaled into [-1, 1] by levels[i] // 2.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from components.quantizers.base import QuantizerOutput, check_finite, check_last_dim, index_stats, projections
from components.quantizers.registry import QuantizerConfig, register

MAX_CODES = 2**31
# How far inside (-L/2, L/2) the bound squashes a channel, so that rounding never reaches past it.
BOUND_EPS = 1e-3


@register("fsq")
class FSQConfig(QuantizerConfig):
    type: Literal["fsq"] = "fsq"
    # Levels per channel; the paper's recipes: [8,5,5,5] ~ 1k, [8,8,8,5,5,5] ~ 64k codes.
    levels: list[int] = Field(default_factory=lambda: [8, 5, 5, 5], min_length=1)

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[int]) -> list[int]:
        bad = [lvl for lvl in value if lvl < 2]
        if bad:
            raise ValueError(f"every level must be >= 2 (a channel with one level carries nothing), got {value}")
        if math.prod(value) > MAX_CODES:
            raise ValueError(f"{value} gives {math.prod(value)} codes, more than 2^31")
        return value

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def latent_problems(self, latent_dim: int) -> list[tuple[str, str]]:
        if len(self.levels) > latent_dim:
            return [("levels", f"{len(self.levels)} channels is more than latent_dim={latent_dim}")]
        return []

    def build(self, dim: int) -> FSQ:
        self.check_latent(dim)
        return FSQ(self, dim)


class FSQ(nn.Module):
    """Input (b, h, w, d) or (b, n, d); indices (b, h, w) or (b, n). With d != len(levels), a
    learned projection in and out."""

    index_dtype = torch.int64
    tokens_per_position = 1
    token_names = ("code",)

    def __init__(self, cfg: FSQConfig, dim: int):
        super().__init__()
        levels = list(cfg.levels)
        self.levels_list = levels
        self.dim = dim
        self.code_dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.eps = BOUND_EPS
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer(
            "radix",
            torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.long),
            persistent=False,
        )
        self.register_buffer(
            "half_width", torch.tensor([lvl // 2 for lvl in levels], dtype=torch.float32), persistent=False
        )
        self.project_in, self.project_out = projections(dim, self.code_dim)

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """Squash each channel into a range that rounds to exactly levels[i] integers: (-L/2, L/2)
        for odd L; shifted by a half for even L, so the integers are -L/2 .. L/2 - 1."""
        levels = self.levels.float()
        half = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(h + shift) * half - offset

    def digits_to_codes(self, digits: torch.Tensor) -> torch.Tensor:
        """(..., c) digits in [0, L_i) -> (..., c) code values in [-1, 1]."""
        return (digits.float() - self.half_width) / self.half_width

    def indices_to_digits(self, indices: torch.Tensor) -> torch.Tensor:
        return (indices.unsqueeze(-1) // self.radix) % self.levels

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., d)"""
        return self.project_out(self.digits_to_codes(self.indices_to_digits(indices)))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim)
        flat = z.reshape(-1, self.dim).float()
        if self.training:
            check_finite(flat)
        bounded = self.bound(self.project_in(flat))
        rounded = torch.round(bounded)
        digits = (rounded.detach() + self.half_width).long()
        indices = (digits * self.radix).sum(dim=-1)
        # Forward: the grid value itself; backward: the identity through the rounding.
        codes = self.digits_to_codes(digits) + (bounded - bounded.detach()) / self.half_width
        quantized = self.project_out(codes).view_as(z).to(z.dtype)
        stats = index_stats(indices, self.codebook_size, reduce=self.training)
        return QuantizerOutput(quantized, indices.view(z.shape[:-1]), flat.new_zeros(()), stats)
