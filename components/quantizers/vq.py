"""Vector quantization (van den Oord et al. 2017) with EMA codebook updates and dead-code restart.

Nearest code by squared distance, computed without autograd in row chunks so the full
N x K distance matrix never exists; quantized vectors are gathered by index (no one-hot matmul).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.quantizers.base import QuantizerOutput, check_finite, usage_stats
from components.quantizers.registry import QuantizerConfig, register


@register("vq")
class VQConfig(QuantizerConfig):
    type: Literal["vq"] = "vq"
    codebook_size: int = Field(128, ge=2)
    # Commitment weight: how hard the encoder is pulled towards its code.
    beta: float = Field(0.25, ge=0)
    # EMA codebook (stable, no codebook gradient) or codebook learned by gradient.
    ema: bool = True
    decay: float = Field(0.99, gt=0, lt=1)
    eps: float = Field(1e-5, gt=0)
    # Codes unused for this many training steps are re-seeded from encoder outputs (0: never).
    restart_after_steps: int = Field(100, ge=0)
    # Rows per chunk of the nearest-code search: bounds memory at chunk x codebook_size floats.
    search_chunk_size: int = Field(8192, ge=1)

    def build(self, dim: int) -> "VectorQuantizer":
        return VectorQuantizer(
            codebook_size=self.codebook_size,
            dim=dim,
            beta=self.beta,
            ema=self.ema,
            decay=self.decay,
            eps=self.eps,
            restart_after_steps=self.restart_after_steps,
            search_chunk_size=self.search_chunk_size,
        )


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """Index of the nearest code for each row of z.

    z: (n, d), codebook: (k, d) -> (n,) int64. Ties go to the lowest index. Computed in fp32 in
    chunks of `chunk_size` rows: memory is chunk_size x k, never n x k.
    """
    z = z.float()
    codebook = codebook.float()
    code_sq = (codebook * codebook).sum(dim=1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        for start in range(0, z.shape[0], chunk_size):
            rows = z[start : start + chunk_size]
            # |z|^2 is constant per row, so it does not change the argmin.
            dist_sq = torch.addmm(code_sq, rows, codebook.t(), alpha=-2.0)
            out[start : start + chunk_size] = dist_sq.argmin(dim=1)
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over replicas, in place; returns the tensor."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer. Input (b, h, w, d) or (b, n, d); indices (b, h, w) or (b, n)."""

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_after_steps: int = 100,
        search_chunk_size: int = 8192,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.restart_after_steps = restart_after_steps
        self.search_chunk_size = search_chunk_size
        init = torch.randn(codebook_size, dim) / dim**0.5
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.zeros(codebook_size))
            self.register_buffer("embed_sum", torch.zeros(codebook_size, dim))
        else:
            self.codebook = nn.Parameter(init)
        # Steps since each code was last chosen, for dead-code restart.
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        # Codebook seeded from the first training batch's encoder outputs.
        self.register_buffer("initialized", torch.tensor(False))

    index_dtype = torch.int64

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...,) int -> (..., d) code vectors."""
        return F.embedding(indices, self.codebook)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got input of shape {tuple(z.shape)}")
        flat = z.reshape(-1, self.dim)
        if self.training:
            check_finite(flat)
            if not bool(self.initialized):
                self._seed_codes(flat.detach(), torch.arange(self.codebook_size, device=z.device))
                self.initialized.fill_(True)
        indices = nearest_codes(flat, self.codebook, self.search_chunk_size)
        # Counted once per step: the stats, the EMA update and dead-code restart all use them.
        counts = torch.bincount(indices, minlength=self.codebook_size)
        stats = usage_stats(counts)
        if self.training:
            # Replicas must see the same statistics or their codebooks drift apart.
            global_counts = _all_reduce_sum(counts.clone())
            if self.ema:
                self._ema_update(flat.detach(), indices, global_counts)
            self._restart_dead_codes(flat.detach(), global_counts)
        quantized = self.indices_to_codes(indices).view_as(z).to(z.dtype)
        commitment = F.mse_loss(z, quantized.detach())
        if self.ema:
            loss = self.beta * commitment
        else:
            loss = F.mse_loss(quantized, z.detach()) + self.beta * commitment
        # Straight-through: forward gives the code, backward passes the gradient to z unchanged.
        quantized = z + (quantized - z).detach()
        return QuantizerOutput(quantized, indices.view(z.shape[:-1]), loss, stats)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """counts: (k,) code counts, already summed over replicas."""
        sums = _all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, indices, flat.float()))
        self.cluster_size.mul_(self.decay).add_(counts.float(), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        if self.restart_after_steps <= 0:
            return
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_unused >= self.restart_after_steps).nonzero().squeeze(1)
        if dead.numel():
            self._seed_codes(flat, dead)

    @torch.no_grad()
    def _seed_codes(self, flat: torch.Tensor, which: torch.Tensor) -> None:
        """Re-seed codes `which` from random encoder outputs, their EMA statistics with them."""
        pick = torch.randint(0, flat.shape[0], (which.numel(),), device=flat.device)
        vectors = flat[pick].float().contiguous()
        if _distributed():
            # Every replica takes rank 0's choice, so the codebooks stay identical.
            dist.broadcast(vectors, src=0)
        self.codebook.data[which] = vectors
        if self.ema:
            # A restarted code starts as a cluster of one at its new vector: resetting only the
            # vector would let the old (empty) EMA sums drag it straight back.
            self.cluster_size[which] = 1.0
            self.embed_sum[which] = vectors
        self.steps_unused[which] = 0
