"""What a source gives the `shard` stage: units of work and the raw samples read from them
(see `components.data.sources`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class SourceItem:
    key: str  # unique, stable, free of dots (WebDataset splits names at the first dot)
    ref: str | int  # a path relative to the folder, or an index into a procedural dataset
    label: int | None = None


@dataclass(frozen=True)
class Reject:
    input: str
    reason: str


@dataclass(frozen=True)
class SourceUnit:
    """A piece of a source read, written and retried as a whole. `name` is how the manifest
    names it; `ref` is the source's own (a list of items, a shard URL, a Parquet file)."""

    index: int
    name: str
    ref: Any


@dataclass
class RawSample:
    """One input as read: an encoded image (or an image already made), its label and caption
    when it has them, and what else is known about it (`meta`, kept as the shard's `json`)."""

    key: str
    input: str  # how a reject names it (a path, or shard#key)
    image: bytes | Image.Image | None
    label: int | None = None
    caption: bytes | str | None = None
    meta: dict = field(default_factory=dict)
    reject: str | None = None  # already known to be unusable, and why


class SourceError(ValueError):
    """A source that cannot be used as configured (nothing matches it, a Parquet column that
    is missing or of the wrong type): raised when the source is opened, before any work."""
