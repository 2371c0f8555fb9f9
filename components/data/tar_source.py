"""`webdataset:SPEC`: a corpus of WebDataset tar shards, as img2dataset writes them.

SPEC has the grammar of `vqpipe tokenize --input` (`components.data.corpus.expand_inputs`):
local paths or fsspec URLs, brace patterns, globs, `pipe:` commands, `@FILE` lists. Each shard
is one unit. A sample's image is its first `jpg`/`jpeg`/`png`/`webp`/`bmp` field; `txt` is
its caption, `json` its metadata (kept, with `source: SHARD#KEY` added where it has none),
`cls` its label when it is an integer class id (any other `cls` text goes into the metadata).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from components.data.corpus import REJECT, expand_inputs, read_shard, stat_input
from components.data.limits import DEFAULT_LIMITS, ReadLimits
from components.data.shards import sample_image_bytes
from components.data.units import RawSample, SourceError, SourceUnit


def _readable_anywhere(url: str) -> str:
    """A local path made absolute: Ray workers do not share this process's working directory."""
    if url.startswith("pipe:") or "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


INT32 = 2**31  # labels are int32 columns and embedding indices


def _class_id(raw: bytes | None) -> int | None:
    """The class id of a `cls` field: an integer in [0, 2**31); None for anything else (which
    then goes into the metadata as text)."""
    if raw is None:
        return None
    try:
        value = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if 0 <= value < INT32 else None


def _meta(raw: bytes | None) -> dict:
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return {"json": raw.decode("utf-8", errors="replace")}
    return parsed if isinstance(parsed, dict) else {"json": parsed}


class TarShards:
    """The shards a WebDataset spec names; no class names (labels are the integer `cls` ids)."""

    def __init__(self, spec: str, limits: ReadLimits = DEFAULT_LIMITS):
        self.limits = limits
        try:
            self.names = expand_inputs(spec, limits.allow_pipe_in_lists)
        except ValueError as err:
            raise SourceError(f"shard.source webdataset:{spec}: {err}") from None
        if not self.names:
            raise SourceError(f"shard.source webdataset:{spec} names no shards")
        self.description = f"webdataset:{spec}"
        self.classes = None

    def units(self, plan=None) -> tuple[list[SourceUnit], list]:
        return [SourceUnit(i, name, _readable_anywhere(name)) for i, name in enumerate(self.names)], []

    def samples(self, unit: SourceUnit) -> Iterator[RawSample]:
        for sample in read_shard(unit.ref, self.limits):
            key = sample["__key__"]
            where = f"{unit.name}#{key}"
            if REJECT in sample:  # no sample, or one that cannot be used (a repeated key among them)
                yield RawSample(key, where, None, reject=sample[REJECT])
                continue
            meta = {"source": where, **_meta(sample.get("json"))}
            label = _class_id(sample.get("cls"))
            if label is None and sample.get("cls") is not None:
                meta["cls"] = sample["cls"].decode("utf-8", errors="replace")
            image = sample_image_bytes(sample)
            reject = None if image is not None else "no image field"
            yield RawSample(key, where, image, label, sample.get("txt"), meta, reject)

    def listing(self) -> Iterator[tuple[str, int, str]]:
        for name in self.names:
            yield (name, *stat_input(_readable_anywhere(name)))
