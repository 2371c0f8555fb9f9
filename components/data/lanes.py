"""Lanes: the fixed partition of training data that makes its order independent of how many
processes read it.

The data is split into `lanes` (a tracked setting): lane l reads its own share of every epoch
(the shards, or row groups, l, l + L, ... of that epoch's shuffled order; with fewer of them
than lanes, every one keeping the samples l, l + L, ...) through its own shuffle buffer. Each
lane is thus an endless, deterministic sequence of samples, whoever reads it.

Global batch k (the `batch_size` samples of step k, over every DDP rank) is made of lanes in
order: its positions p with p * L // B == l are lane l's next `size_l` samples, the samples
k * size_l ... (k + 1) * size_l - 1 of that lane. Rank r of W takes the positions
r * B / W ... (r + 1) * B / W - 1, a *piece* of each lane they cover. However many ranks and
loader processes share the work, batch k holds the same samples in the same order: worker
counts change speed, never results. A lane is read by every process that takes a piece of it,
each skipping (reading, not decoding) the samples of the others: with lanes a multiple of
ranks x loader processes, every lane is read once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class Piece(NamedTuple):
    """A rank's share of one lane in every global batch: of the lane's `size` samples in each
    batch, those at `lo` ... `hi` - 1."""

    lane: int
    size: int
    lo: int
    hi: int

    def span(self, batch: int) -> tuple[int, int]:
        """The lane's sample numbers [start, stop) this piece holds in global batch `batch`."""
        return batch * self.size + self.lo, batch * self.size + self.hi


def lane_starts(batch_size: int, lanes: int) -> list[int]:
    """The first batch position of each lane, and batch_size after the last: ceil(l * B / L)."""
    return [-(-lane * batch_size // lanes) for lane in range(lanes + 1)]


def pieces(batch_size: int, lanes: int, rank: int = 0, world_size: int = 1) -> list[Piece]:
    """Rank `rank`'s pieces, in batch order: concatenated, they are its batch_size / world_size
    positions of every global batch."""
    if not 1 <= lanes <= batch_size:
        raise ValueError(f"lanes ({lanes}) must be between 1 and the batch size ({batch_size})")
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the DDP workers ({world_size})")
    per_rank = batch_size // world_size
    first, last = rank * per_rank, (rank + 1) * per_rank
    starts = lane_starts(batch_size, lanes)
    out = []
    for lane in range(lanes):
        start, stop = starts[lane], starts[lane + 1]
        lo, hi = max(start, first), min(stop, last)
        if lo < hi:
            out.append(Piece(lane, stop - start, lo - start, hi - start))
    return out


def lane_buffer(shuffle_buffer: int, lanes: int) -> int:
    """Each lane's share of the shuffle buffer (`shuffle_buffer` is the total, so memory does not
    grow with the lanes); 0 stays 0 (no shuffling)."""
    return max(1, shuffle_buffer // lanes) if shuffle_buffer else 0


class LaneCursor(Generic[T]):
    """One lane's samples, read forward: `take(start, stop)` passes over the samples before
    `start` (they are read, not decoded) and returns those up to `stop`."""

    def __init__(self, items: Iterator[T]):
        self.items = items
        self.position = 0

    def take(self, start: int, stop: int) -> list[T]:
        if start < self.position:
            raise RuntimeError(f"lane read backwards: sample {start} asked after {self.position}")
        for _ in range(start - self.position):
            next(self.items)
        out = [next(self.items) for _ in range(stop - start)]
        self.position = stop
        return out
