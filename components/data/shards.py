"""WebDataset shards: the split of a key, the manifest, and reading shards back.

Written by `components.data.shard_writer`; training reads them through
`components.data.stream.TrainingStream`, evaluation through `split_batches`.

Layout: `{split}-{n:06d}.tar`, each sample `__key__`, `png` (or `jpg`), `cls` (class id as
text, when labelled), `txt` (the caption, when it has one), `json` (where it came from, the
input's own metadata and the class name, when known); `manifest.json` and `rejects.jsonl`
beside them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from components.data.corpus import REJECT, read_shard
from components.data.images import decode_image, to_array
from components.data.units import Reject
from components.io import atomic_write, write_json

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"


def assign_split(key: str, val_fraction: float, seed: int | str) -> str:
    """'train' or 'val' from a hash of the key: stable whatever the order or number of inputs."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(
    out_dir: str | Path, shards: list[dict], rejects: list[Reject], failed: list[dict], info: dict
) -> dict:
    """manifest.json and rejects.jsonl; returns the manifest. `shards`: per output shard its
    name, split, inputs, samples, rejected and sha256. Counts add up by construction:
    inputs = written + rejected, per shard and in total (the inputs of a unit that could not be
    read are unknown: such units are listed under `failed`, with their error)."""
    out_dir = Path(out_dir)
    written = {split: sum(s["samples"] for s in shards if s["split"] == split) for split in ("train", "val")}
    listed = len(rejects) - sum(s["rejected"] for s in shards)  # rejected before any unit was read
    manifest = {
        **info,
        "inputs": listed + sum(s["inputs"] for s in shards),
        "samples": written,
        "rejected": len(rejects),
        "shards": shards,
        "failed": failed,
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


def split_batches(
    shard_dir: str | Path, split: str, batch_size: int, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """A split streamed in shard order, `batch_size` samples at a time (the last batch may be
    smaller): (b, 3, H, W) uint8, (b,) int64 labels (-1: unlabelled), keys. Memory holds one
    batch, whatever the split's size; `limit` stops after that many samples."""
    images, labels, keys, seen = [], [], [], 0
    for url in shard_paths(shard_dir, split):
        for sample in iter_shard(url):
            img, label = decode_training_sample(sample)
            images.append(img)
            labels.append(label)
            keys.append(sample["__key__"])
            seen += 1
            if len(images) == batch_size or seen == limit:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long), keys
                images, labels, keys = [], [], []
            if seen == limit:
                return
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.long), keys


def iter_shard(url: str) -> Iterator[dict]:
    """Raw samples of one shard, in order (bytes per field plus `__key__`), read whole wherever
    this runs; raises `ShardUnreadable` for a missing or truncated shard (see `read_shard`)."""
    for sample in read_shard(url):
        if REJECT not in sample:  # the shard stage writes none; a hand-made shard may hold them
            yield sample


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (b, 3, H, W) -> float in [0, 1]."""
    return images.float().div_(255.0)


__all__ = [
    "assign_split",
    "decode_training_sample",
    "iter_shard",
    "load_split",
    "read_manifest",
    "sample_image_bytes",
    "sample_label",
    "shard_paths",
    "split_batches",
    "to_float",
    "write_manifest",
]
