"""The prior's training stream: endless, shuffled, deterministic batches of token rows read
from Parquet token parts, split over DDP ranks, and resumable at a batch.

The order is set by the lanes (components/data/lanes.py), never by the number of ranks: per
epoch the parts' row groups are shuffled from (seed, epoch); lane l reads the row groups
l, l + L, ... of that order, or, when there are fewer row groups than lanes, every row group
keeping the rows l, l + L, ...; its rows pass a shuffle buffer seeded from (seed, l). A rank's
batch is its pieces of the global batch, so the global batch k is the same rows in the same
order for any number of ranks. Memory holds a row group and a buffer per lane read, whatever
the corpus's size: nothing is read before it is needed.

Resuming at batch B: each lane skips the rows of the batches before B, so the batches from B on
are the uninterrupted run's, exactly (same lanes and batch size). Skipping costs reading token
rows, which is cheap next to a training step.

For a text prior each row also carries its caption's ids (`caption_len` slots,
components/data/captions.py), and rows whose caption is one of `held_out` are never given: the
combinations evaluate prompts with are kept out of training, row by row as the parts stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from components.data.captions import caption_matrix
from components.data.lanes import LaneCursor, lane_buffer, pieces
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
    """Yields this rank's batches, (int64 (b, L) token rows, int64 (b,) labels, -1 where
    unlabelled, and with `caption_len` int64 (b, caption_len) caption ids, else None), forever:
    its batch_size / world_size positions of each global batch.

    tiers: the parts' token columns per tier (`PartInfo.tiers`): rows are flattened as
    `read_tokens` flattens them. held_out: captions whose rows are skipped."""

    def __init__(
        self,
        paths: list,
        tiers: list[list[str]],
        batch_size: int,
        *,
        lanes: int = 1,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        seed: int = 0,
        start_batch: int = 0,
        caption_len: int = 0,
        held_out: frozenset[str] = frozenset(),
    ):
        self.groups = row_groups(paths)
        self.caption_len, self.held_out = caption_len, frozenset(held_out)
        if not self.groups:
            raise ValueError("no token rows to train on")
        self.tiers, self.lanes = tiers, lanes
        self.pieces = pieces(batch_size, lanes, rank, world_size)
        self.buffer = lane_buffer(shuffle_buffer, lanes)
        self.seed, self.start_batch = seed, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        cursors = {p.lane: LaneCursor(self._lane(p.lane)) for p in self.pieces}
        batch = self.start_batch
        while True:
            rows = [row for p in self.pieces for row in cursors[p.lane].take(*p.span(batch))]
            tokens = torch.from_numpy(np.stack([row[0] for row in rows]))
            labels = torch.tensor([row[1] for row in rows], dtype=torch.long)
            captions = torch.from_numpy(np.stack([row[2] for row in rows])) if self.caption_len else None
            yield tokens, labels, captions
            batch += 1

    def _read(self, group: RowGroup) -> tuple[np.ndarray, np.ndarray, list | None]:
        # One thread: a row group is small, and pyarrow's pool would compete with training for cores.
        table = pq.ParquetFile(group.path).read_row_group(group.index, use_threads=False)
        captions = None
        if self.caption_len:
            if "caption" not in table.column_names:
                raise ValueError(f"{group.path} has no caption column: a text prior needs captioned token parts")
            captions = table.column("caption").to_pylist()
        return sequences(table, self.tiers), row_labels(table), captions

    def epoch(self, n: int, lane: int) -> Iterator[tuple]:
        """Lane `lane`'s rows of epoch `n`, before its shuffle buffer: over all lanes, every row
        of the parts exactly once."""
        order = list(range(len(self.groups)))
        random.Random(f"{self.seed}:epoch:{n}").shuffle(order)
        by_group = len(order) >= self.lanes
        seen = 0
        for i, g in enumerate(order):
            if by_group and i % self.lanes != lane:
                continue
            tokens, labels, captions = self._read(self.groups[g])
            for r in range(len(tokens)):
                seen += 1
                if not by_group and (seen - 1) % self.lanes != lane:
                    continue
                # A copy: a view would keep the whole row group alive in the buffer.
                if captions is None:
                    yield tokens[r].copy(), int(labels[r]), None
                elif captions[r] not in self.held_out:
                    yield tokens[r].copy(), int(labels[r]), caption_matrix([captions[r]], self.caption_len)[0].numpy()

    def _epochs(self, lane: int) -> Iterator[tuple]:
        n = 0
        while True:
            got = 0
            for item in self.epoch(n, lane):
                got += 1
                yield item
            if not got:
                raise ValueError(
                    f"token lane {lane} of {self.lanes} got no rows from {len(self.groups)} row groups: "
                    "fewer lanes (train_prior.lanes) or more data"
                )
            n += 1

    def _lane(self, lane: int) -> Iterator[tuple]:
        return buffer_shuffled(self._epochs(lane), self.buffer, f"{self.seed}:buffer:{lane}")
