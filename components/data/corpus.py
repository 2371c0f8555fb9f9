"""Input shard lists of an image corpus: what `vqpipe tokenize --input` accepts.

A spec is one of, or a list mixing:
- a local path or any fsspec URL of one shard (`/data/00000.tar`, `s3://bucket/00000.tar`,
  `https://host/00000.tar`), or a `pipe:` command (kept as it is; `read_shard` runs it);
- a brace pattern, expanded without listing anything (`s3://bucket/{00000..09999}.tar`);
- a glob, listed on its filesystem (`/data/*.tar`, `gs://bucket/laion/**/*.tar`);
- `@FILE`: a local file with one spec per line (blank lines and `#` comments skipped).

Expansion keeps the given order and drops repeats. Nothing is read or downloaded by expansion:
a listed shard that turns out missing is reported when `read_shard` streams it.
"""

from __future__ import annotations

import contextlib
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import fsspec
from braceexpand import braceexpand

GLOB_CHARS = "*?["


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in GLOB_CHARS)


def _glob(pattern: str) -> list[str]:
    if pattern.startswith(("http://", "https://")):
        raise ValueError(
            f"cannot list {pattern!r}: HTTP has no directory listing (give a brace pattern or a file of URLs)"
        )
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


class ShardUnreadable(Exception):
    """An input shard that cannot be read as a whole: missing, not a tar, truncated, or its
    `pipe:` command failed. Distinct from a bad sample inside a readable shard (a reject)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self):  # pickles whole across processes (Ray returns it to the driver)
        return type(self), (self.url, self.reason)


class _Tail:
    """A read-only stream that remembers the last 512 bytes read (to check the tar's end)."""

    def __init__(self, raw):
        self.raw = raw
        self.tail = b""
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.size += len(data)
        self.tail = (self.tail + data)[-512:]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@contextlib.contextmanager
def _open(url: str) -> Iterator:
    """A binary stream of the shard: a local path, any fsspec URL, or `pipe:COMMAND`."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        failure: BaseException | None = None
        try:
            yield proc.stdout
            proc.stdout.read()  # let the command finish writing
        except GeneratorExit:
            proc.kill()  # the reader stopped early: the command's output is not wanted
            raise
        except BaseException as err:  # reported below, after the command's own status
            failure = err
        finally:
            proc.stdout.close()
            err_text = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
            code = proc.wait()
        if code != 0:
            raise ShardUnreadable(url, f"command exited with status {code}: {err_text[-500:]}") from failure
        if failure is not None:
            raise failure
        return

    with fsspec.open(url, "rb") as f:
        yield f


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's member naming: `dir/key.ext.more` -> (`dir/key`, `ext.more`)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1 :]


def read_shard(url: str) -> Iterator[dict]:
    """The samples of one WebDataset tar shard, in order: `{"__key__", "__url__", ext: bytes}`.

    Reads as a stream (nothing is downloaded whole). Raises ShardUnreadable when the shard is
    missing, is not a tar, or ends early: a truncated tar is caught both inside a member and
    between members (an uncompressed tar must end with zero blocks)."""
    compressed = url.endswith((".gz", ".tgz", ".bz2", ".xz"))
    try:
        with _open(url) as raw:
            stream = _Tail(raw)
            current: dict | None = None
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    # A streamed TarFile still lists every member it has read: forget them, or a
                    # shard's headers pile up in memory (about 1 KiB per member).
                    tar.members = []
                    if not member.isfile():
                        continue
                    parts = _split_name(member.name)
                    if parts is None:
                        continue
                    key, ext = parts
                    data = tar.extractfile(member).read()
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[ext.lower()] = data
            stream.drain()
            if not compressed and (stream.size == 0 or stream.tail.count(0) != len(stream.tail)):
                raise ShardUnreadable(url, "truncated tar: it ends without the end-of-archive blocks")
            if current is not None:
                yield current
    except ShardUnreadable:
        raise
    except FileNotFoundError as err:
        raise ShardUnreadable(url, f"no such shard ({err})") from err
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        text = str(err) or type(err).__name__
        if "unexpected end" in text or isinstance(err, EOFError):
            text = f"truncated tar: {text}"
        raise ShardUnreadable(url, text) from err


def stat_input(url: str) -> tuple[int, str]:
    """(size in bytes, version) of an input without reading it, to tell whether it changed:
    the version is the modification time, or the object store's ETag or generation; a `pipe:`
    command cannot be looked into (0, "command"), a missing input is (-1, "missing")."""
    if url.startswith("pipe:"):
        return 0, "command"
    if "://" not in url or url.startswith("file://"):
        try:
            stat = Path(url.removeprefix("file://")).stat()
        except FileNotFoundError:
            return -1, "missing"
        return stat.st_size, str(stat.st_mtime_ns)
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return -1, "missing"
    version = next((str(info[k]) for k in VERSION_KEYS if info.get(k) is not None), "")
    return int(info.get("size") or 0), version


# What object stores and HTTP servers call a version of an object, in order of preference.
VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "LastModified", "last_modified", "mtime", "updated")
