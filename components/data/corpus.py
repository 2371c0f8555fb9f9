"""Input shard lists of an image corpus: what `vqpipe tokenize --input` accepts.

A spec is one of, or a list mixing:
- a local path or any fsspec URL of one shard (`/data/00000.tar`, `s3://bucket/00000.tar`,
  `https://host/00000.tar`), or a `pipe:` command (kept as it is, WebDataset runs it);
- a brace pattern, expanded without listing anything (`s3://bucket/{00000..09999}.tar`);
- a glob, listed on its filesystem (`/data/*.tar`, `gs://bucket/laion/**/*.tar`);
- `@FILE`: a local file with one spec per line (blank lines and `#` comments skipped).

Expansion keeps the given order and drops repeats. Nothing is read or downloaded here: a listed
shard that turns out missing is the tokenizer's to report.
"""

from __future__ import annotations

from pathlib import Path

from braceexpand import braceexpand

GLOB_CHARS = "*?["


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in GLOB_CHARS)


def _glob(pattern: str) -> list[str]:
    import fsspec

    if pattern.startswith(("http://", "https://")):
        raise ValueError(f"cannot list {pattern!r}: HTTP has no directory listing (give a brace pattern or a file of URLs)")
    fs, path = fsspec.core.url_to_fs(pattern)
    local = "://" not in pattern or pattern.startswith("file://")
    found = sorted(fs.glob(path))
    return [p if local else fs.unstrip_protocol(p) for p in found]


def expand_inputs(spec: str | list[str]) -> list[str]:
    """The shard URLs a spec (or list of specs) names, in order, each once; raises ValueError
    when a glob or `@FILE` matches nothing, naming it."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    seen: set[str] = set()

    def add(url: str) -> None:
        if url not in seen:
            seen.add(url)
            out.append(url)

    for item in specs:
        item = item.strip()
        if not item:
            continue
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise ValueError(f"{item!r}: no such file of shard URLs")
            lines = [line.strip() for line in listing.read_text().splitlines()]
            urls = expand_inputs([line for line in lines if line and not line.startswith("#")] or [])
            if not urls:
                raise ValueError(f"{item!r} lists no shards")
            for url in urls:
                add(url)
            continue
        if item.startswith("pipe:"):
            add(item)
            continue
        for expanded in braceexpand(item):
            if _is_glob(expanded):
                matches = _glob(expanded)
                if not matches:
                    raise ValueError(f"no input shards match {expanded!r}")
                for match in matches:
                    add(match)
            else:
                add(expanded)
    return out
