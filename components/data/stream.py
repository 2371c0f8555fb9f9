"""The training stream: endless, shuffled, deterministic batches from WebDataset shards, split
over distributed ranks and DataLoader workers, and resumable at a batch.

Every (rank, loader worker) pair plays a *role* g of G = world_size x loader workers. Per epoch
the shard order is shuffled from (seed, epoch), the same for every role; role g then reads the
shards g, g+G, ... of that order, or, when there are fewer shards than roles, every shard
keeping the samples g, g+G, ... Samples pass a shuffle buffer seeded from (seed, g), undecoded,
and are decoded only once they are kept, so skipping ahead costs reading, not decoding.

Resuming at batch B: a DataLoader hands out batch i from worker i mod W. The resumed loader's
worker w takes role (w + B) mod W, so its first batch is the one role B mod W would have made
next, and each role skips the samples of the batches it had made before B. The batch sequence
is then the uninterrupted run's, exactly, when the number of roles and the per-rank batch size
are unchanged (`resumable_position`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from components.data.shards import decode_training_sample, iter_shard

T = TypeVar("T")


def batches_made_by(role: int, batches: int, workers: int) -> int:
    """How many of the first `batches` batches DataLoader worker `role` (of `workers`) made."""
    return max(0, (batches - role + workers - 1) // workers)


class StreamLayout(NamedTuple):
    """Who reads what: `batch_size` samples per batch of this rank, `rank` of `world_size` DDP
    workers, each with `loader_workers` DataLoader processes (0: it decodes itself)."""

    batch_size: int
    rank: int = 0
    world_size: int = 1
    loader_workers: int = 0


class TrainingStream(IterableDataset):
    """Yields (uint8 (b, 3, H, W), int64 (b,) labels) batches forever; use with
    `DataLoader(stream, batch_size=None, num_workers=layout.loader_workers)`."""

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
        self.batch_size = layout.batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = layout.rank
        self.world_size = layout.world_size
        self.loader_workers = max(layout.loader_workers, 1)
        self.start_batch = start_batch
        self.keep = keep  # only samples whose key it accepts (None: all)

    @property
    def roles(self) -> int:
        return self.world_size * self.loader_workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local_role = (worker + self.start_batch) % self.loader_workers
        role = self.rank * self.loader_workers + local_role
        skip = batches_made_by(local_role, self.start_batch, self.loader_workers) * self.batch_size
        images, labels = [], []
        for i, sample in enumerate(self._shuffled(role)):
            if i < skip:
                continue
            image, label = decode_training_sample(sample)
            images.append(image)
            labels.append(label)
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
                images, labels = [], []

    def _epochs(self, role: int) -> Iterator[dict]:
        epoch = 0
        while True:
            order = list(self.urls)
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            by_shard = len(order) >= self.roles
            got = seen = 0
            for n, url in enumerate(order):
                if by_shard and n % self.roles != role:
                    continue
                for sample in iter_shard(url):
                    if self.keep is not None and not self.keep(sample["__key__"]):
                        continue
                    seen += 1
                    if not by_shard and (seen - 1) % self.roles != role:
                        continue
                    got += 1
                    yield sample
            if not got:
                raise ValueError(f"training role {role} of {self.roles} got no samples from {len(order)} shards")
            epoch += 1

    def _shuffled(self, role: int) -> Iterator[dict]:
        return buffer_shuffled(self._epochs(role), self.shuffle_buffer, f"{self.seed}:buffer:{role}")


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
