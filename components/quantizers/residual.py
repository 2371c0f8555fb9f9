"""Residual quantization (Zeghidour et al. 2021; Lee et al. 2022): N stages, each quantizing what
the stages before it left over. N tokens per position, coarse to fine; the quantized vector is
the sum of the stages' codes.

Optional quantizer dropout (SoundStream): in training a sample keeps, with probability
`dropout`, only its first n ~ U{1..N} stages, so the decoder learns to work from any prefix of
the stages (a bitrate chosen at inference). Per sample, not per batch, so every codebook stays
in every step's graph (DDP needs that).

With `codebook_dim` the input is projected once, the stages quantize in that space and the sum
is projected back. Cosine codes are refused: a residual's norm shrinks stage by stage, and
normalising it would throw away exactly what the later stages must encode.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from components.quantizers.base import (
    QuantizerOutput,
    check_finite,
    check_last_dim,
    code_counts,
    mean_stats,
    projections,
    straight_through,
    usage_stats,
)
from components.quantizers.registry import register
from components.quantizers.vq import VectorQuantizer, VQOptions


@register("residual")
class ResidualConfig(VQOptions):
    type: Literal["residual"] = "residual"
    stages: int = Field(4, ge=2)
    # One codebook searched by every stage (RQ-VAE), or one per stage.
    shared_codebook: bool = False
    # Share of training samples that use only a random prefix of the stages.
    dropout: float = Field(0.0, ge=0.0, le=1.0)

    def latent_problems(self, latent_dim: int) -> list[tuple[str, str]]:
        problems = super().latent_problems(latent_dim)
        if self.cosine:
            problems.append(("cosine", "not supported for residual stages (a residual's norm is information)"))
        return problems

    def build(self, dim: int) -> ResidualQuantizer:
        self.check_latent(dim)
        code_dim = self.codebook_dim or dim
        stage_options = self.model_copy(update={"codebook_dim": None})
        books = [stage_options.build_codebook(code_dim) for _ in range(1 if self.shared_codebook else self.stages)]
        return ResidualQuantizer(books, self.stages, dim, self.dropout)


class ResidualQuantizer(nn.Module):
    """Input (b, h, w, d) or (b, n, d); indices (b, h, w, N) or (b, n, N), stage s at [..., s]."""

    index_dtype = torch.int64

    def __init__(self, codebooks: list[VectorQuantizer], stages: int, dim: int, dropout: float):
        super().__init__()
        self.codebooks = nn.ModuleList(codebooks)
        self.shared = len(codebooks) == 1
        self.stages = stages
        self.dim = dim
        self.code_dim = codebooks[0].dim
        self.dropout = dropout
        self.project_in, self.project_out = projections(dim, self.code_dim)
        self.codebook_size = codebooks[0].codebook_size
        self.tokens_per_position = stages
        self.token_names = tuple(f"stage{s}" for s in range(stages))

    def book(self, stage: int) -> VectorQuantizer:
        return self.codebooks[0 if self.shared else stage]

    def indices_to_codes(self, indices: torch.Tensor, stages: int | None = None) -> torch.Tensor:
        """(..., N) -> (..., d): the sum of the first `stages` (default all) stages' codes."""
        total = torch.zeros(*indices.shape[:-1], self.code_dim, device=indices.device)
        for s in range(stages or self.stages):
            total = total + torch.nn.functional.embedding(indices[..., s], self.book(s).code_vectors())
        return self.project_out(total)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim)
        flat = z.reshape(-1, self.dim).float()
        if self.training:
            check_finite(flat)
        h = self.project_in(flat)
        active = self._active_stages(z)  # (n,) stages each row keeps
        residual = h
        total = torch.zeros_like(h)
        found, rows = [], []
        for s in range(self.stages):
            step = self.book(s).lookup(residual)
            keep = active > s
            total = total + step.codes.detach() * keep.unsqueeze(1)
            # Later stages see what this one left; the codes are constants to them.
            residual = residual - step.codes.detach()
            found.append(step)
            rows.append(keep)
        losses = [
            self.book(s).loss(f, None if self.dropout == 0 else r)
            for s, (f, r) in enumerate(zip(found, rows, strict=True))
        ]
        stats = self._learn(found, rows) if self.training else self._eval_stats(found)
        # Forward: the sum of the kept codes; backward: the identity to the encoder (or the
        # rotation trick onto that sum).
        quantized = self.project_out(straight_through(h, total, self.book(0).rotation_trick))
        quantized = quantized.view_as(z).to(z.dtype)
        indices = torch.stack([f.indices for f in found], dim=-1).view(*z.shape[:-1], self.stages)
        return QuantizerOutput(quantized, indices, torch.stack(losses).mean(), stats)

    def _active_stages(self, z: torch.Tensor) -> torch.Tensor:
        rows_per_sample = z[0].numel() // self.dim
        count = torch.full((z.shape[0],), self.stages, device=z.device)
        if self.training and self.dropout > 0:
            drop = torch.rand(z.shape[0], device=z.device) < self.dropout
            prefix = torch.randint(1, self.stages + 1, (z.shape[0],), device=z.device)
            count = torch.where(drop, prefix, count)
        return count.repeat_interleave(rows_per_sample)

    def _learn(self, found, rows) -> dict[str, torch.Tensor]:
        kept = [(f.h[r], f.indices[r]) for f, r in zip(found, rows, strict=True)]
        if self.shared:
            # One update from every stage's rows: the decay applies once per step, not N times.
            counts = self.codebooks[0].learn([h for h, _ in kept], [i for _, i in kept])
            return usage_stats(counts)
        return mean_stats(
            [usage_stats(book.learn([h], [i])) for book, (h, i) in zip(self.codebooks, kept, strict=True)]
        )

    def _eval_stats(self, found) -> dict[str, torch.Tensor]:
        if self.shared:
            return usage_stats(code_counts(torch.cat([f.indices for f in found]), self.codebook_size, reduce=False))
        return mean_stats([usage_stats(code_counts(f.indices, self.codebook_size, reduce=False)) for f in found])
