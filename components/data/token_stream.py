"""The prior's training stream: endless, shuffled, deterministic batches of token rows read
from Parquet token parts, split over DDP ranks, and resumable at a batch.

Per epoch the parts' row groups are shuffled from (seed, epoch), the same order on every rank;
rank r of W reads the row groups r, r+W, ... of that order, or, when there are fewer row
groups than ranks, every row group keeping the rows r, r+W, ... Rows pass a shuffle buffer
seeded from (seed, rank). Memory holds one row group and the buffer, whatever the corpus's
size: nothing is read before it is needed.

Resuming at batch B: the rank replays its stream and drops the first B batches' rows, so the
batches from B on are the uninterrupted run's, exactly (for the same ranks and batch size).
Replaying costs reading token rows, which is cheap next to a training step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from components.data.stream import buffer_shuffled
from components.data.tokens import row_labels, sequences


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    rows: int


def row_groups(paths: list) -> list[RowGroup]:
    """Every row group of the parts, in part order, from their footers (nothing else is read)."""
    groups = []
    for path in paths:
        meta = pq.read_metadata(path)
        groups += [RowGroup(str(path), i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return [g for g in groups if g.rows]


class TokenStream:
    """Yields (int64 (b, L) token rows, int64 (b,) labels, -1 where unlabelled) forever.

    tiers: the parts' token columns per tier (`PartInfo.tiers`): rows are flattened as
    `read_tokens` flattens them."""

    def __init__(
        self,
        paths: list,
        tiers: list[list[str]],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        seed: int = 0,
        start_batch: int = 0,
    ):
        self.groups = row_groups(paths)
        if not self.groups:
            raise ValueError("no token rows to train on")
        self.tiers, self.batch_size = tiers, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed, self.start_batch = shuffle_buffer, seed, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip = self.start_batch * self.batch_size
        rows: list[np.ndarray] = []
        labels: list[int] = []
        for i, (row, label) in enumerate(self._shuffled()):
            if i < skip:
                continue
            rows.append(row)
            labels.append(label)
            if len(rows) == self.batch_size:
                yield torch.from_numpy(np.stack(rows)), torch.tensor(labels, dtype=torch.long)
                rows, labels = [], []

    def _read(self, group: RowGroup) -> tuple[np.ndarray, np.ndarray]:
        # One thread: a row group is small, and pyarrow's pool would compete with training for cores.
        table = pq.ParquetFile(group.path).read_row_group(group.index, use_threads=False)
        return sequences(table, self.tiers), row_labels(table)

    def epoch(self, n: int) -> Iterator[tuple[np.ndarray, int]]:
        """This rank's rows of epoch `n`, before the shuffle buffer: over all ranks, every row
        of the parts exactly once."""
        roles, role = self.world_size, self.rank
        order = list(range(len(self.groups)))
        random.Random(f"{self.seed}:epoch:{n}").shuffle(order)
        by_group = len(order) >= roles
        seen = 0
        for i, g in enumerate(order):
            if by_group and i % roles != role:
                continue
            tokens, labels = self._read(self.groups[g])
            for r in range(len(tokens)):
                seen += 1
                if not by_group and (seen - 1) % roles != role:
                    continue
                # A copy: a view would keep the whole row group alive in the buffer.
                yield tokens[r].copy(), int(labels[r])

    def _epochs(self) -> Iterator[tuple[np.ndarray, int]]:
        n = 0
        while True:
            got = 0
            for item in self.epoch(n):
                got += 1
                yield item
            if not got:
                raise ValueError(
                    f"rank {self.rank} of {self.world_size} got no token rows from {len(self.groups)} row groups"
                )
            n += 1

    def _shuffled(self) -> Iterator[tuple[np.ndarray, int]]:
        return buffer_shuffled(self._epochs(), self.shuffle_buffer, f"{self.seed}:buffer:{self.rank}")
