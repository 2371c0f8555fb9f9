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
import stat
from collections.abc import Iterator
from pathlib import Path

from components.data import shapes
from components.data.corpus import printable
from components.data.files import FileTooLarge, read_regular_file
from components.data.limits import DEFAULT_LIMITS, ReadLimits
from components.data.parquet_source import ParquetImages
from components.data.tar_source import TarShards
from components.data.units import RawSample, Reject, SourceError, SourceItem, SourceUnit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class BuiltinShapes:
    """`builtin:shapes`: `num_images` procedural images, captioned with what is drawn on them
    ("a red triangle on a white background"); identical for the same seed."""

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
            drawing = shapes.draw(int(item.ref), self.seed)
            yield RawSample(item.key, str(item.ref), drawing.image, drawing.label, drawing.caption)

    def listing(self) -> Iterator[tuple[str, int, str]]:
        yield self.description, 0, ""


class ImageFolder:
    """`folder:PATH`: every jpg/png/webp/bmp below PATH; class = first subfolder when there are any.

    Only regular files are read: symbolic links, FIFOs, sockets and devices are rejects (a link
    to /dev/zero or a FIFO would never end), as are files over `limits.max_file_bytes` (read
    bounded, never whole) and other files, so inputs = written + rejected holds over the whole
    tree; with class subfolders, files lying directly in PATH are rejected as unlabelled. Names
    that are not UTF-8 are read as they are and reported with backslash escapes."""

    def __init__(self, root: str | Path, limits: ReadLimits = DEFAULT_LIMITS):
        # Absolute, so the source still finds its files when loaded in another process.
        self.root = Path(root).expanduser().resolve()
        self.limits = limits
        if not self.root.is_dir():
            raise SourceError(f"shard.source: folder {self.root} does not exist or is not a directory")
        self.description = f"folder:{self.root}"
        subdirs = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        )
        self.classes = [printable(name) for name in subdirs] or None
        self._class_dirs = subdirs

    def _entries(self) -> Iterator[tuple[str, str | None]]:
        """Every entry below the root but folders, as (relative POSIX path, why it cannot be
        read or None), in a fixed order. Linked folders are not followed."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            kept = []
            for d in dirnames:
                if d.startswith("."):
                    continue
                if Path(dirpath, d).is_symlink():
                    rel = Path(dirpath, d).relative_to(self.root).as_posix()
                    yield rel, "a symbolic link (only regular files are read from folders)"
                    continue
                kept.append(d)
            dirnames[:] = kept
            for name in sorted(filenames):
                path = Path(dirpath, name)
                yield path.relative_to(self.root).as_posix(), _not_regular(path)

    def _files(self) -> Iterator[str]:
        """Regular files below the root, as relative POSIX paths, in a fixed order."""
        return (rel for rel, problem in self._entries() if problem is None)

    def items(self) -> tuple[list[SourceItem], list[Reject]]:
        class_ids = {name: i for i, name in enumerate(self._class_dirs)}
        items, rejects = [], []
        for rel, problem in self._entries():
            if problem is not None:
                rejects.append(Reject(printable(rel), problem))
                continue
            if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
                rejects.append(
                    Reject(printable(rel), f"not an image file (extension not in {', '.join(IMAGE_EXTENSIONS)})")
                )
                continue
            label = None
            if self.classes is not None:
                top = rel.split("/", 1)[0]
                if top not in class_ids:
                    rejects.append(Reject(printable(rel), "outside the class subfolders (unlabelled)"))
                    continue
                label = class_ids[top]
            key = "img-" + hashlib.sha1(os.fsencode(rel)).hexdigest()[:20]
            items.append(SourceItem(key, rel, label))
        return items, rejects

    def units(self, plan) -> tuple[list[SourceUnit], list[Reject]]:
        items, rejects = self.items()
        return plan(items), rejects

    def samples(self, unit: SourceUnit) -> Iterator[RawSample]:
        for item in unit.ref:
            rel = str(item.ref)
            name = printable(rel)
            try:
                data = read_regular_file(self.root / rel, self.limits.max_file_bytes)
            except FileTooLarge as err:
                yield RawSample(item.key, name, None, reject=str(err))
                continue
            except OSError as err:  # vanished, replaced or unreadable since it was listed: this input only
                yield RawSample(item.key, name, None, reject=f"unreadable file: {err}")
                continue
            yield RawSample(item.key, name, data, item.label, meta={"source": name})

    def listing(self) -> Iterator[tuple[str, int, str]]:
        for rel in self._files():
            info = (self.root / rel).stat()
            yield printable(rel), info.st_size, str(info.st_mtime_ns)


def _not_regular(path: Path) -> str | None:
    """Why the folder entry cannot be read as an image file, or None for a regular file."""
    try:
        mode = path.lstat().st_mode
    except OSError as err:
        return f"unreadable file: {err}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link (only regular files are read from folders)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (only regular files are read from folders)"
    if stat.S_ISSOCK(mode):
        return "a socket (only regular files are read from folders)"
    return "a device or other special file (only regular files are read from folders)"


def open_source(cfg, check: bool = True):
    """The source `cfg.source` names (`cfg`: the shard stage's settings). Raises SourceError
    (a ValueError) for a source that cannot be used as configured, before any work.
    `check=False`: only what `listing()` needs (no Parquet schema or label pass)."""
    kind, _, arg = cfg.source.partition(":")
    if kind == "builtin" and arg == "shapes":
        return BuiltinShapes(cfg.num_images, cfg.seed)
    limits = cfg.limits.read_limits()
    if kind == "folder":
        return ImageFolder(arg, limits)
    if kind == "webdataset":
        return TarShards(arg, limits)
    if kind == "parquet":
        return ParquetImages(arg, cfg.parquet, check, limits)
    raise SourceError(
        f"unknown source {cfg.source!r} (allowed: builtin:shapes, folder:PATH, webdataset:SPEC, parquet:SPEC)"
    )


__all__ = ["BuiltinShapes", "ImageFolder", "RawSample", "Reject", "SourceItem", "SourceUnit", "open_source"]
