"""What every quantizer returns, and helpers they share.

The interface every registered quantizer module implements:

    out = quantizer(z)               # z: (b, h, w, d) or (b, n, d)
    out.quantized                    # same shape as z; straight-through to z in training
    out.indices                      # (b, h, w) or (b, n) int64; with several tokens per position
                                     # (product groups, residual stages) (b, h, w, m) / (b, n, m)
    quantizer.indices_to_codes(out.indices) == out.quantized   # forward values
    quantizer.codebook_size          # tokens lie in [0, codebook_size)
    quantizer.tokens_per_position    # m above (1 for vq, gumbel, fsq, lfq)
    quantizer.token_names            # one name per token of a position, for Parquet columns
    quantizer.index_dtype            # torch.int64
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Past this many codes a dense count vector (and its all-reduce) costs more than it tells:
# usage is then counted from the distinct indices of the local batch instead.
DENSE_COUNT_LIMIT = 1 << 20


class QuantizerOutput(NamedTuple):
    """quantized: same shape as the input, straight-through to it in training.
    indices: input shape without the last dim (plus a trailing tokens-per-position dim for
    product/residual), int64 in [0, codebook_size).
    loss: scalar to add to the training loss.
    stats: detached scalars for logging (`codebook_usage` in %, `perplexity`)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over replicas, in place (a no-op outside torch.distributed); returns the tensor."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's value on every replica, in place (a no-op outside torch.distributed): random
    choices that move a codebook (k-means seeds, restarted codes) are made once for all."""
    if distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def replica_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every replica's `rows`, in rank order, on each (itself outside torch.distributed). Ranks
    hold consecutive positions of the global batch with equal row counts, so this is the rows
    one process would have had: a random choice among them does not depend on the replicas."""
    if not distributed():
        return rows
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


def code_counts(indices: torch.Tensor, codebook_size: int, reduce: bool) -> torch.Tensor:
    """(k,) count of each code in `indices`; summed over replicas when `reduce` (training:
    every replica then logs and acts on the same numbers)."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size)
    return all_reduce_sum(counts) if reduce else counts


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


def index_stats(indices: torch.Tensor, codebook_size: int, reduce: bool) -> dict[str, torch.Tensor]:
    """Usage and perplexity of a batch of indices, for codebooks of any size.

    Up to DENSE_COUNT_LIMIT codes: dense counts, all-reduced when `reduce`. Beyond (LFQ/FSQ
    with 2^21+ codes) a dense vector would be megabytes per step: the distinct indices of the
    local batch are counted instead."""
    if codebook_size <= DENSE_COUNT_LIMIT:
        return usage_stats(code_counts(indices, codebook_size, reduce))
    _, counts = torch.unique(indices.reshape(-1), return_counts=True)
    stats = usage_stats(counts)
    stats["codebook_usage"] = torch.tensor(counts.numel() / codebook_size * 100.0)
    return stats


def mean_stats(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average per-codebook stats (product groups, residual stages) into one set."""
    return {key: torch.stack([p[key] for p in parts]).mean() for key in parts[0]}


def projections(dim: int, code_dim: int) -> tuple[nn.Module, nn.Module]:
    """Learned in/out projections between the latent (dim) and the space a quantizer works in
    (code_dim); identities when the two are the same width."""
    if dim == code_dim:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, code_dim), nn.Linear(code_dim, dim)


def rotation_to(h: torch.Tensor, codes: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, eq. 4.2) as a function of the inputs h (n, d):
    each row rotated onto the direction of its code and rescaled to its norm, the rotation R and
    the scale |q| / |h| held constant. Its value is (up to rounding) `codes`; its gradient to h is
    (|q| / |h|) R^T times the gradient at the code, where R = I - 2 w w^T + 2 q^ h^T (h^ = h / |h|,
    q^ = q / |q|, w = (h^ + q^) / |h^ + q^|) is the rotation that takes h^ to q^ in their plane.

    The straight-through estimator copies the code's gradient to h unchanged; rotated, it keeps
    the angle between the gradient and the code and scales with how far h is from it, so inputs
    in one Voronoi cell get different gradients, which pushes codes apart and keeps more in use."""
    with torch.no_grad():
        h_norm = h.norm(dim=1, keepdim=True)
        q_norm = codes.norm(dim=1, keepdim=True)
        u = h / h_norm.clamp(min=eps)
        q = codes / q_norm.clamp(min=eps)
        w = F.normalize(u + q, dim=1, eps=eps)
        scale = q_norm / h_norm.clamp(min=eps)
    rotated = h - 2.0 * (h * w).sum(1, keepdim=True) * w + 2.0 * (h * u).sum(1, keepdim=True) * q
    return scale * rotated


def straight_through(h: torch.Tensor, codes: torch.Tensor, rotate: bool = False) -> torch.Tensor:
    """(n, d) quantized vectors: exactly the codes forward; backward the identity to h
    (straight-through), or with `rotate` the rotation trick (`rotation_to`). Written so the
    forward value is the code itself, not h + (code - h), nor the rotation's rounding of it."""
    moved = rotation_to(h, codes) if rotate else h
    return codes.detach() + (moved - moved.detach())


def check_finite(z: torch.Tensor, what: str = "encoder output") -> None:
    """A NaN would silently poison an EMA codebook for good: stop at the step it appears."""
    if not torch.isfinite(z).all():
        bad = (~torch.isfinite(z)).sum().item()
        raise FloatingPointError(f"{what} has {bad} non-finite values (NaN/inf); refusing to quantize")


def check_last_dim(z: torch.Tensor, dim: int) -> None:
    if z.ndim not in (3, 4) or z.shape[-1] != dim:
        raise ValueError(f"expected input (b, h, w, {dim}) or (b, n, {dim}), got shape {tuple(z.shape)}")


@contextmanager
def deferred_updates(model: nn.Module) -> Iterator[None]:
    """The quantizers of `model` that learn in `forward` (EMA codebooks, dead-code counters,
    Gumbel's temperature clock) keep what each forward saw and learn from it once, on leaving:
    several micro-batches then move them as one batch of them all would. Nothing is learned
    when the block raises."""
    learners = [m for m in model.modules() if hasattr(m, "begin_deferred")]
    for learner in learners:
        learner.begin_deferred()
    try:
        yield
    except BaseException:
        for learner in learners:
            learner.finish_deferred(apply=False)
        raise
    for learner in learners:
        learner.finish_deferred()
