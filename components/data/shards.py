"""WebDataset shards: writing partitions atomically, the manifest, and streaming for training.

Training reads them through `components.data.stream.TrainingStream`.

Layout: `{split}-{n:06d}.tar`, each sample `__key__`, `png`, `cls` (class id as text, when
labelled), `json` (source path and class name, when known); `manifest.json` and
`rejects.jsonl` beside them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import webdataset as wds

from components.data.corpus import read_shard
from components.data.images import DECODE_ERRORS, decode_image, describe_error, encode_png, to_array
from components.data.sources import Reject, SourceItem
from components.io import atomic_write, write_json

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"


def assign_split(key: str, val_fraction: float, seed: int) -> str:
    """'train' or 'val' from a hash of the key: stable whatever the order or number of inputs."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Partition:
    """One output shard's worth of inputs: the unit of parallel work."""

    split: str
    index: int
    items: list[SourceItem]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass
class PartitionResult:
    name: str
    split: str
    inputs: int
    written: int
    sha256: str
    rejects: list[Reject] = field(default_factory=list)


def plan_partitions(items: list[SourceItem], val_fraction: float, seed: int, per_shard: int) -> list[Partition]:
    by_split: dict[str, list[SourceItem]] = {"train": [], "val": []}
    for item in items:
        by_split[assign_split(item.key, val_fraction, seed)].append(item)
    partitions = []
    for split, split_items in by_split.items():
        for n, start in enumerate(range(0, len(split_items), per_shard)):
            partitions.append(Partition(split, n, split_items[start : start + per_shard]))
    return partitions


def write_partition(
    source, partition: Partition, out_dir: str | Path, image_size: int, classes: list[str] | None
) -> PartitionResult:
    """Load, preprocess and write one partition to `out_dir/partition.name`, atomically."""
    out_dir = Path(out_dir)
    final = out_dir / partition.name
    rejects: list[Reject] = []
    written = 0

    def write(tmp: str) -> None:
        nonlocal written
        # A fixed mtime makes shards byte-reproducible: same inputs, same sha256, and DVC sees
        # an unchanged output when a rerun changes nothing.
        with wds.TarWriter(tmp, mtime=0.0) as sink:
            for item in partition.items:
                try:
                    img, label, meta = source.load(item, image_size)
                except DECODE_ERRORS as err:
                    rejects.append(Reject(str(item.ref), describe_error(err)))
                    continue
                sample = {"__key__": item.key, "png": encode_png(img)}
                if label is not None:
                    sample["cls"] = str(label)
                    if classes:
                        meta = {**meta, "class_name": classes[label]}
                if meta:
                    sample["json"] = json.dumps(meta, sort_keys=True)
                sink.write(sample)
                written += 1

    atomic_write(final, write)
    return PartitionResult(partition.name, partition.split, len(partition.items), written, sha256_file(final), rejects)


def write_manifest(
    out_dir: str | Path, results: list[PartitionResult], early_rejects: list[Reject], info: dict
) -> dict:
    """manifest.json and rejects.jsonl; returns the manifest. Counts add up by construction:
    inputs = written + rejected, per shard and in total."""
    out_dir = Path(out_dir)
    rejects = list(early_rejects) + [r for res in results for r in res.rejects]
    shards = [
        {
            "name": r.name,
            "split": r.split,
            "inputs": r.inputs,
            "samples": r.written,
            "rejected": len(r.rejects),
            "sha256": r.sha256,
        }
        for r in sorted(results, key=lambda r: r.name)
    ]
    written = {split: sum(s["samples"] for s in shards if s["split"] == split) for split in ("train", "val")}
    manifest = {
        **info,
        "inputs": len(early_rejects) + sum(r.inputs for r in results),
        "samples": written,
        "rejected": len(rejects),
        "shards": shards,
    }
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in rejects)
    atomic_write(out_dir / REJECTS, lambda tmp: Path(tmp).write_text(lines))
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the shard stage first (dvc repro shard)")
    return json.loads(path.read_text())


def shard_paths(shard_dir: str | Path, split: str) -> list[str]:
    """The split's non-empty shards, in order, from the manifest."""
    manifest = read_manifest(shard_dir)
    return [str(Path(shard_dir) / s["name"]) for s in manifest["shards"] if s["split"] == split and s["samples"] > 0]


def sample_image_bytes(sample: dict) -> bytes | None:
    for ext in IMAGE_KEYS:
        if ext in sample:
            return sample[ext]
    return None


def sample_label(sample: dict) -> int:
    """Class id, or -1 for an unlabelled sample."""
    raw = sample.get("cls")
    return int(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else -1


def decode_training_sample(sample: dict) -> tuple[torch.Tensor, int]:
    data = sample_image_bytes(sample)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
    return torch.from_numpy(to_array(decode_image(data))), sample_label(sample)


def load_split(
    shard_dir: str | Path, split: str, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole split in memory, in shard order: (n, 3, H, W) uint8, (n,) int64 labels, keys."""
    images, labels, keys = [], [], []
    for sample in (sample for url in shard_paths(shard_dir, split) for sample in iter_shard(url)):
        img, label = decode_training_sample(sample)
        images.append(img)
        labels.append(label)
        keys.append(sample["__key__"])
        if limit and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no {split} samples in {shard_dir}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), keys


def iter_shard(url: str) -> Iterator[dict]:
    """Raw samples of one shard, in order (bytes per field plus `__key__`), read whole wherever
    this runs; raises `ShardUnreadable` for a missing or truncated shard (see `read_shard`)."""
    yield from read_shard(url)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (b, 3, H, W) -> float in [0, 1]."""
    return images.float().div_(255.0)


__all__ = [
    "Partition",
    "PartitionResult",
    "assign_split",
    "decode_training_sample",
    "iter_shard",
    "load_split",
    "plan_partitions",
    "read_manifest",
    "sample_image_bytes",
    "sample_label",
    "shard_paths",
    "to_float",
    "write_manifest",
    "write_partition",
]
