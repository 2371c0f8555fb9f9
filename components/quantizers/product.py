"""Product quantization (Jegou et al. 2011): the vector split into M groups, each quantized by its
own nearest-code codebook. M tokens per position, one per group, each in [0, codebook_size):
M codebooks of K codes describe K^M vectors for the memory and search cost of M*K.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from components.quantizers.base import QuantizerOutput, check_last_dim, mean_stats
from components.quantizers.registry import register
from components.quantizers.vq import VQOptions


@register("product")
class ProductConfig(VQOptions):
    type: Literal["product"] = "product"
    groups: int = Field(2, ge=2)

    def latent_problems(self, latent_dim: int) -> list[tuple[str, str]]:
        if latent_dim % self.groups:
            return [("groups", f"{self.groups} groups do not divide latent_dim={latent_dim}")]
        width = latent_dim // self.groups
        if self.codebook_dim is not None and self.codebook_dim > width:
            return [
                ("codebook_dim", f"{self.codebook_dim} is larger than a group's width (latent_dim / groups = {width})")
            ]
        return []

    def build(self, dim: int) -> ProductQuantizer:
        self.check_latent(dim)
        return ProductQuantizer([self.build_codebook(dim // self.groups) for _ in range(self.groups)])


class ProductQuantizer(nn.Module):
    """Input (b, h, w, d) or (b, n, d); indices (b, h, w, M) or (b, n, M), group g in the last
    dim covering channels [g*d/M, (g+1)*d/M)."""

    index_dtype = torch.int64

    def __init__(self, codebooks: list[nn.Module]):
        super().__init__()
        self.codebooks = nn.ModuleList(codebooks)
        self.group_dim = codebooks[0].dim
        self.dim = self.group_dim * len(codebooks)
        self.codebook_size = codebooks[0].codebook_size
        self.tokens_per_position = len(codebooks)
        self.token_names = tuple(f"group{g}" for g in range(len(codebooks)))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(..., M) -> (..., d)"""
        return torch.cat([book.indices_to_codes(indices[..., g]) for g, book in enumerate(self.codebooks)], dim=-1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim)
        outs = [book(part) for book, part in zip(self.codebooks, z.split(self.group_dim, dim=-1), strict=True)]
        return QuantizerOutput(
            quantized=torch.cat([o.quantized for o in outs], dim=-1),
            indices=torch.stack([o.indices for o in outs], dim=-1),
            # Each group's loss is a mean over its channels: their mean is the whole vector's.
            loss=torch.stack([o.loss for o in outs]).mean(),
            stats=mean_stats([o.stats for o in outs]),
        )
