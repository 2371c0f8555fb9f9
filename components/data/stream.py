"""The training stream: endless, shuffled, deterministic batches from WebDataset shards, split
over distributed ranks and DataLoader workers, and resumable at a batch.

The data order is set by the lanes (components/data/lanes.py), never by the worker counts:
lane l reads the shards l, l + L, ... of each epoch's order (shuffled from (seed, epoch)), or,
when there are fewer shards than lanes, every shard keeping the samples l, l + L, ...; its
samples pass a shuffle buffer seeded from (seed, l), undecoded, and are decoded only once a
piece takes them, so skipping costs reading, not decoding.

A rank's batch is its pieces of the global batch, concatenated. The DataLoader hands out one
piece per item, item i from worker i mod W: worker w makes the items w, w + W, ... of the rank's
sequence (batch i // P, piece i mod P for P pieces a batch), reading the lanes of its pieces.
Resuming at batch B starts that sequence at item B x P: the batches from B on are the
uninterrupted run's, exactly, whatever the workers before and after (same lanes, same batch).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from components.data.lanes import LaneCursor, lane_buffer, pieces
from components.data.shards import decode_training_sample, iter_shard

T = TypeVar("T")
Batch = tuple[torch.Tensor, torch.Tensor]


class StreamLayout(NamedTuple):
    """What is read and who reads it: global batches of `batch_size` samples (every rank's
    together) from `lanes` lanes, this being rank `rank` of `world_size` DDP workers, each with
    `loader_workers` DataLoader processes (0: it decodes itself). Only `batch_size` and `lanes`
    decide the batches."""

    batch_size: int
    lanes: int = 1
    rank: int = 0
    world_size: int = 1
    loader_workers: int = 0


class TrainingStream(IterableDataset):
    """Yields this rank's pieces, (uint8 (n, 3, H, W), int64 (n,) labels), forever; use with
    `DataLoader(stream, batch_size=None, num_workers=layout.loader_workers)` and `assembled`, or
    `stream.batches()` in the process itself."""

    def __init__(
        self,
        urls: list[str],
        layout: StreamLayout,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        start_batch: int = 0,
        keep: Callable[[str], bool] | None = None,
    ):
        if not urls:
            raise ValueError("no shards to read")
        self.urls = list(urls)
        self.lanes = layout.lanes
        self.pieces = pieces(layout.batch_size, layout.lanes, layout.rank, layout.world_size)
        self.buffer = lane_buffer(shuffle_buffer, layout.lanes)
        self.seed = seed
        self.loader_workers = max(layout.loader_workers, 1)
        self.start_batch = start_batch
        self.keep = keep  # only samples whose key it accepts (None: all)

    @property
    def pieces_per_batch(self) -> int:
        return len(self.pieces)

    def batches(self) -> Iterator[Batch]:
        """This rank's batches, read in this process."""
        return assembled(iter(self), self.pieces_per_batch)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        item = self.start_batch * len(self.pieces) + (info.id if info is not None else 0)
        cursors: dict[int, LaneCursor[dict]] = {}
        while True:
            batch, n = divmod(item, len(self.pieces))
            piece = self.pieces[n]
            if piece.lane not in cursors:
                cursors[piece.lane] = LaneCursor(self._lane(piece.lane))
            decoded = [decode_training_sample(s) for s in cursors[piece.lane].take(*piece.span(batch))]
            yield torch.stack([image for image, _ in decoded]), torch.tensor([y for _, y in decoded], dtype=torch.long)
            item += self.loader_workers

    def _epochs(self, lane: int) -> Iterator[dict]:
        epoch = 0
        while True:
            order = list(self.urls)
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            by_shard = len(order) >= self.lanes
            got = seen = 0
            for n, url in enumerate(order):
                if by_shard and n % self.lanes != lane:
                    continue
                for sample in iter_shard(url):
                    if self.keep is not None and not self.keep(sample["__key__"]):
                        continue
                    seen += 1
                    if not by_shard and (seen - 1) % self.lanes != lane:
                        continue
                    got += 1
                    yield sample
            if not got:
                raise ValueError(
                    f"training lane {lane} of {self.lanes} got no samples from {len(order)} shards: "
                    "fewer lanes (train_tokenizer.lanes) or more data"
                )
            epoch += 1

    def _lane(self, lane: int) -> Iterator[dict]:
        return buffer_shuffled(self._epochs(lane), self.buffer, f"{self.seed}:buffer:{lane}")


def assembled(pieces: Iterator[Batch], per_batch: int, pin_memory: bool = False) -> Iterator[Batch]:
    """Batches from consecutive pieces, `per_batch` at a time (pinned when asked: the loader
    pins pieces, which concatenating would copy out of pinned memory)."""
    while True:
        parts = [next(pieces) for _ in range(per_batch)]
        if per_batch == 1:
            images, labels = parts[0]
        else:
            images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if pin_memory:
            images = images.pin_memory()
        yield images, labels


def buffer_shuffled(items: Iterable[T], size: int, seed: str) -> Iterator[T]:
    """`items` through a shuffle buffer of `size` (0: in order), seeded by `seed`: once full, each
    new item takes the place of a random one, which is given out. Endless for endless items."""
    if not size:
        yield from items
        return
    rng = random.Random(seed)
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(len(buffer))
        buffer[j], item = item, buffer[j]
        yield item
