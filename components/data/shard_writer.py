"""Writing one unit of a source into WebDataset shards: decode, preprocess, split, write.

A unit's samples are streamed: each is decoded and resized to `image_size` (or rejected with the
reason), given its split from a hash of its key, and appended to the tar of that split, a new
tar every `samples_per_shard` inputs. Memory holds one sample and the open tar writers. The
tars are written under staging names (`.unit-UUUUUU-SPLIT-CCCCC.tar`) that the stage renames
to `{split}-{n:06d}.tar` once every unit is done, in unit order: the same inputs give the same
shards, byte for byte, however the units were spread over processes.

A unit that cannot be read whole (`ShardUnreadable`) is retried; its staged tars are removed
first, so nothing of a failed attempt survives. After the last attempt it is reported with its
error, and nothing of it is written.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image

from components.data.corpus import ShardUnreadable
from components.data.images import DECODE_ERRORS, decode_image, describe_error, encode_png, resize_center_crop
from components.data.limits import PILLOW_MAX_IMAGE_PIXELS
from components.data.shards import assign_split, sha256_file
from components.data.units import RawSample, Reject, SourceItem, SourceUnit

SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardLayout:
    """What every unit is written with (the shard stage's outcome settings)."""

    image_size: int
    val_fraction: float
    seed: int
    samples_per_shard: int
    image_format: str = "png"  # png (lossless) | jpg (quality 95)
    max_caption_chars: int = 2048
    classes: tuple[str, ...] | None = None
    max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS


@dataclass
class OutputShard:
    split: str
    file: str  # its staging name in the output directory
    inputs: int = 0
    samples: int = 0
    rejected: int = 0
    sha256: str = ""


@dataclass
class UnitResult:
    unit: int
    name: str
    inputs: int = 0
    outputs: list[OutputShard] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    captions: Counter = field(default_factory=Counter)  # written, invalid_utf8, truncated
    attempts: int = 1
    error: str | None = None  # the unit could not be read: nothing of it was written


def plan_units(items: list[SourceItem], val_fraction: float, seed: int, per_shard: int) -> list[SourceUnit]:
    """Listed inputs grouped by split, `per_shard` at a time: one unit per output shard."""
    by_split: dict[str, list[SourceItem]] = {split: [] for split in SPLITS}
    for item in items:
        by_split[assign_split(item.key, val_fraction, seed)].append(item)
    units: list[SourceUnit] = []
    for split, split_items in by_split.items():
        for n, start in enumerate(range(0, len(split_items), per_shard)):
            units.append(SourceUnit(len(units), f"{split}-{n:06d}", split_items[start : start + per_shard]))
    return units


def clean_caption(raw: bytes | str, max_chars: int) -> tuple[str, list[str]]:
    """The caption as text, and what was done to it: `invalid_utf8` (undecodable bytes became
    U+FFFD) and `truncated` (cut to `max_chars` characters)."""
    done = []
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("utf-8", errors="replace")
            done.append("invalid_utf8")
    if len(raw) > max_chars:
        raw = raw[:max_chars]
        done.append("truncated")
    return raw, done


def _encode(img: Image.Image, fmt: str) -> bytes:
    if fmt == "png":
        return encode_png(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class _SplitTars:
    """The open tar of each split, a new one every `samples_per_shard` inputs."""

    def __init__(self, out_dir: Path, unit: int, layout: ShardLayout):
        self.out_dir, self.unit, self.layout = out_dir, unit, layout
        self.outputs: list[OutputShard] = []
        self.open: dict[str, tuple[OutputShard, wds.TarWriter]] = {}
        self.chunks: Counter = Counter()

    def shard(self, split: str) -> tuple[OutputShard, wds.TarWriter | None]:
        current = self.open.get(split)
        if current is not None and current[0].inputs >= self.layout.samples_per_shard:
            self._close(split)
            current = None
        if current is None:
            entry = OutputShard(split, f".unit-{self.unit:06d}-{split}-{self.chunks[split]:05d}.tar")
            self.chunks[split] += 1
            # A fixed mtime makes shards byte-reproducible: same inputs, same sha256.
            current = (entry, wds.TarWriter(str(self.out_dir / entry.file), mtime=0.0))
            self.open[split] = current
            self.outputs.append(entry)
        return current

    def _close(self, split: str) -> None:
        entry, sink = self.open.pop(split)
        sink.close()
        entry.sha256 = sha256_file(self.out_dir / entry.file)

    def close(self) -> list[OutputShard]:
        for split in list(self.open):
            self._close(split)
        return self.outputs

    def discard(self) -> None:
        for _, sink in self.open.values():
            sink.close()
        self.open.clear()
        for entry in self.outputs:
            (self.out_dir / entry.file).unlink(missing_ok=True)
        self.outputs.clear()


def _write_once(source, unit: SourceUnit, out_dir: Path, layout: ShardLayout) -> UnitResult:
    result = UnitResult(unit.index, unit.name)
    tars = _SplitTars(out_dir, unit.index, layout)
    try:
        for raw in source.samples(unit):
            result.inputs += 1
            entry, sink = tars.shard(assign_split(raw.key, layout.val_fraction, layout.seed))
            entry.inputs += 1
            sample = _prepare(raw, layout, result)
            if sample is None:
                entry.rejected += 1
                continue
            sink.write(sample)
            entry.samples += 1
        result.outputs = tars.close()
    except BaseException:
        tars.discard()
        raise
    return result


def _prepare(raw: RawSample, layout: ShardLayout, result: UnitResult) -> dict | None:
    """The sample to write, or None after recording why it is rejected."""
    reason = raw.reject
    if reason is None:
        try:
            if isinstance(raw.image, Image.Image):
                img = resize_center_crop(raw.image.convert("RGB"), layout.image_size)
            else:
                img = decode_image(raw.image, layout.image_size, layout.max_image_pixels)
        except DECODE_ERRORS as err:
            reason = describe_error(err)
    if reason is not None:
        result.rejects.append(Reject(raw.input, reason))
        return None
    sample = {"__key__": raw.key, layout.image_format: _encode(img, layout.image_format)}
    meta = dict(raw.meta)
    if raw.label is not None:
        sample["cls"] = str(raw.label)
        if layout.classes:
            meta["class_name"] = layout.classes[raw.label]
    if meta:
        sample["json"] = _json(meta)
    if raw.caption is not None:
        text, done = clean_caption(raw.caption, layout.max_caption_chars)
        sample["txt"] = text
        result.captions.update(["written", *done])
    return sample


def _json(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, default=str)


def write_unit(
    source, unit: SourceUnit, out_dir: str | Path, layout: ShardLayout, retries: int = 2, retry_delay: float = 0.5
) -> UnitResult:
    """Write `unit` of `source` into staged tars in `out_dir` (see the module doc); a unit that
    cannot be read whole is tried `retries` more times, then returned with its `error`."""
    out_dir = Path(out_dir)
    for attempt in range(1, retries + 2):
        try:
            result = _write_once(source, unit, out_dir, layout)
            result.attempts = attempt
            return result
        except ShardUnreadable as err:
            error = err.reason
            if attempt <= retries:
                time.sleep(retry_delay * attempt)
    return UnitResult(unit.index, unit.name, attempts=retries + 1, error=error)
