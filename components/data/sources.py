"""Where images come from: the built-in procedural datasets, image folders, WebDataset tar
shards (`components.data.tar_source`) and Parquet image datasets (`components.data.parquet_source`).

Every source splits itself into *units*, the pieces the `shard` stage reads, writes and retries
as a whole, each one on its own (a Ray task, or this process): a unit is small and picklable,
so the work can go anywhere, and reading one is bounded by a sample, never by the corpus.

- `builtin:` and `folder:` sources list their inputs up front (names only) and group them
  into units by split, `samples_per_shard` at a time: each unit becomes one output shard.
- `webdataset:` and `parquet:` sources have one unit per input shard or file; the split of
  each sample is decided as it is read, from its key, and a unit becomes a shard per split
  (more when it holds more than `samples_per_shard`).

`samples(unit)` yields `RawSample`s in a fixed order; it raises `ShardUnreadable` when the
unit cannot be read whole (retried, then listed as failed), while a sample that is no usable
image is a reject (`RawSample.reject`, or a decoding error found later).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from components.data import shapes
from components.data.parquet_source import ParquetImages
from components.data.tar_source import TarShards
from components.data.units import RawSample, Reject, SourceError, SourceItem, SourceUnit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class BuiltinShapes:
    """`builtin:shapes`: `num_images` procedural images; identical for the same seed."""

    def __init__(self, num_images: int, seed: int):
        self.num_images, self.seed = num_images, seed
        self.classes = list(shapes.CLASSES)
        self.description = f"builtin:shapes (num_images={num_images}, seed={seed})"

    def items(self) -> tuple[list[SourceItem], list[Reject]]:
        # The label is drawn inside render(); it is filled in when the item is loaded.
        return [SourceItem(f"shapes-{i:08d}", i) for i in range(self.num_images)], []

    def units(self, plan) -> tuple[list[SourceUnit], list[Reject]]:
        items, rejects = self.items()
        return plan(items), rejects

    def samples(self, unit: SourceUnit) -> Iterator[RawSample]:
        for item in unit.ref:
            img, label = shapes.render(int(item.ref), self.seed)
            yield RawSample(item.key, str(item.ref), img, label)

    def listing(self) -> Iterator[tuple[str, int, str]]:
        yield self.description, 0, ""


class ImageFolder:
    """`folder:PATH`: every jpg/png/webp/bmp below PATH; class = first subfolder when there are any.

    Other files are listed as rejects (so inputs = written + rejected holds over the whole tree);
    with class subfolders, files lying directly in PATH are rejected as unlabelled."""

    def __init__(self, root: str | Path):
        # Absolute, so the source still finds its files when loaded in another process.
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceError(f"shard.source: folder {self.root} does not exist or is not a directory")
        self.description = f"folder:{self.root}"
        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = subdirs or None

    def _files(self) -> Iterator[str]:
        """Regular files below the root, as relative POSIX paths, in a fixed order."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.is_file() and not path.is_symlink():
                    yield path.relative_to(self.root).as_posix()

    def items(self) -> tuple[list[SourceItem], list[Reject]]:
        class_ids = {name: i for i, name in enumerate(self.classes or [])}
        items, rejects = [], []
        for rel in self._files():
            if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
                rejects.append(Reject(rel, f"not an image file (extension not in {', '.join(IMAGE_EXTENSIONS)})"))
                continue
            label = None
            if self.classes is not None:
                top = rel.split("/", 1)[0]
                if top not in class_ids:
                    rejects.append(Reject(rel, "outside the class subfolders (unlabelled)"))
                    continue
                label = class_ids[top]
            key = "img-" + hashlib.sha1(rel.encode()).hexdigest()[:20]
            items.append(SourceItem(key, rel, label))
        return items, rejects

    def units(self, plan) -> tuple[list[SourceUnit], list[Reject]]:
        items, rejects = self.items()
        return plan(items), rejects

    def samples(self, unit: SourceUnit) -> Iterator[RawSample]:
        for item in unit.ref:
            rel = str(item.ref)
            try:
                data = (self.root / rel).read_bytes()
            except OSError as err:  # vanished or unreadable since it was listed: this input only
                yield RawSample(item.key, rel, None, reject=f"unreadable file: {err}")
                continue
            yield RawSample(item.key, rel, data, item.label, meta={"source": rel})

    def listing(self) -> Iterator[tuple[str, int, str]]:
        for rel in self._files():
            stat = (self.root / rel).stat()
            yield rel, stat.st_size, str(stat.st_mtime_ns)


def open_source(cfg, check: bool = True):
    """The source `cfg.source` names (`cfg`: the shard stage's settings). Raises SourceError
    (a ValueError) for a source that cannot be used as configured, before any work.
    `check=False`: only what `listing()` needs (no Parquet schema or label pass)."""
    kind, _, arg = cfg.source.partition(":")
    if kind == "builtin" and arg == "shapes":
        return BuiltinShapes(cfg.num_images, cfg.seed)
    if kind == "folder":
        return ImageFolder(arg)
    if kind == "webdataset":
        return TarShards(arg)
    if kind == "parquet":
        return ParquetImages(arg, cfg.parquet, check)
    raise SourceError(
        f"unknown source {cfg.source!r} (allowed: builtin:shapes, folder:PATH, webdataset:SPEC, parquet:SPEC)"
    )


__all__ = ["BuiltinShapes", "ImageFolder", "RawSample", "Reject", "SourceItem", "SourceUnit", "open_source"]
