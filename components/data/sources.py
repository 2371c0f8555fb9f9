"""Where images come from: the built-in procedural datasets and image folders.

A source lists its inputs as small picklable `SourceItem`s (so partitions can go to other
processes) and loads one item at a time; loading raises one of DECODE_ERRORS for a bad input.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from components.data import shapes
from components.data.images import decode_image, resize_center_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class SourceItem:
    key: str  # unique, stable, free of dots (WebDataset splits names at the first dot)
    ref: str | int  # a path relative to the folder, or an index into a procedural dataset
    label: int | None = None


@dataclass(frozen=True)
class Reject:
    input: str
    reason: str


class BuiltinShapes:
    """`builtin:shapes`: `num_images` procedural images; identical for the same seed."""

    def __init__(self, num_images: int, seed: int):
        self.num_images, self.seed = num_images, seed
        self.classes = list(shapes.CLASSES)
        self.description = f"builtin:shapes (num_images={num_images}, seed={seed})"

    def scan(self) -> tuple[list[SourceItem], list[Reject]]:
        # The label is drawn inside render(); it is filled in when the item is loaded.
        return [SourceItem(f"shapes-{i:08d}", i) for i in range(self.num_images)], []

    def load(self, item: SourceItem, size: int) -> tuple[Image.Image, int | None, dict]:
        img, label = shapes.render(int(item.ref), self.seed)
        return resize_center_crop(img, size), label, {}


class ImageFolder:
    """`folder:PATH`: every jpg/png/webp/bmp below PATH; class = first subfolder when there are any.

    Other files are listed as rejects (so inputs = written + rejected holds over the whole tree);
    with class subfolders, files lying directly in PATH are rejected as unlabelled."""

    def __init__(self, root: str | Path):
        # Absolute, so the source still finds its files when loaded in another process.
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard.source: folder {self.root} does not exist or is not a directory")
        self.description = f"folder:{self.root}"
        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = subdirs or None

    def scan(self) -> tuple[list[SourceItem], list[Reject]]:
        class_ids = {name: i for i, name in enumerate(self.classes or [])}
        items, rejects = [], []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
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

    def load(self, item: SourceItem, size: int) -> tuple[Image.Image, int | None, dict]:
        data = (self.root / str(item.ref)).read_bytes()
        return decode_image(data, size), item.label, {"source": str(item.ref)}


def open_source(source: str, num_images: int = 0, seed: int = 0):
    """`builtin:shapes` or `folder:PATH` -> a source object (validated names come from config)."""
    kind, _, arg = source.partition(":")
    if kind == "builtin" and arg == "shapes":
        return BuiltinShapes(num_images, seed)
    if kind == "folder":
        return ImageFolder(arg)
    raise ValueError(f"unknown source {source!r} (allowed: builtin:shapes, folder:PATH)")
