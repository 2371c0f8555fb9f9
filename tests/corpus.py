"""A generated image corpus in WebDataset tar shards, with the odd inputs real corpora have.

`make_corpus(dir, shards)` writes `shards` tar shards of a few samples each: mostly small RGB
PNGs, and among them large JPEGs, grayscale, RGBA, palette, CMYK and 16-bit images, samples
whose image does not decode, a sample with no image at all, captions (`txt`), `json` and `cls`.
The last shard is truncated mid-member. Returns what each shard holds, to check counts against.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class ShardTruth:
    path: Path
    samples: int = 0
    good: list[str] = field(default_factory=list)  # keys that must become rows
    bad: dict[str, str] = field(default_factory=dict)  # key -> a word the reject reason contains
    truncated: bool = False


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _image(rng: np.random.Generator, kind: str) -> tuple[bytes, str]:
    """(bytes, extension) of one test image of the given kind."""
    if kind == "large":
        arr = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
        return _encode(Image.fromarray(arr), "JPEG"), "jpg"
    if kind == "gray":
        return _encode(Image.fromarray(rng.integers(0, 256, (20, 28), dtype=np.uint8), "L"), "PNG"), "png"
    if kind == "rgba":
        return _encode(Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA"), "PNG"), "png"
    if kind == "palette":
        img = Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).convert("P")
        return _encode(img, "PNG"), "png"
    if kind == "cmyk":
        return _encode(
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).convert("CMYK"), "JPEG"
        ), "jpg"
    if kind == "16bit":
        arr = rng.integers(0, 65536, (22, 22), dtype=np.uint16)
        return _encode(Image.fromarray(arr), "PNG"), "png"  # mode I;16
    arr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    return _encode(Image.fromarray(arr), "PNG"), "png"


KINDS = ("rgb", "large", "gray", "rgba", "palette", "cmyk", "16bit")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_corpus(root: Path, shards: int = 24, per_shard: int = 5, seed: int = 0) -> list[ShardTruth]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truths = []
    n = 0
    for s in range(shards):
        truth = ShardTruth(root / f"corpus-{s:05d}.tar")
        with tarfile.open(truth.path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                n += 1
                truth.samples += 1
                if n % 17 == 0:  # bytes that are no image
                    _add(tar, f"{key}.jpg", b"\xff\xd8 not really a jpeg " + rng.bytes(40))
                    truth.bad[key] = "image"
                elif n % 29 == 0:  # a sample with a caption but no image
                    _add(tar, f"{key}.txt", b"an image that went missing")
                    truth.bad[key] = "no image field"
                else:
                    data, ext = _image(rng, KINDS[n % len(KINDS)])
                    _add(tar, f"{key}.{ext}", data)
                    _add(tar, f"{key}.txt", f"caption {key} \u00e9".encode())
                    _add(tar, f"{key}.json", json.dumps({"n": n, "kind": KINDS[n % len(KINDS)]}).encode())
                    _add(tar, f"{key}.cls", str(n % 3).encode())
                    truth.good.append(key)
        truths.append(truth)
    last = truths[-1]
    data = last.path.read_bytes()
    last.path.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    last.truncated = True
    return truths
