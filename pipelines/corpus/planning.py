"""Planning a corpus job: load the tokenizer (ready to ship to actors), and sort the inputs
into complete parts to keep and shards to tokenize, reading only the existing parts' footers.

A part is kept when it is complete, made by the same tokenizer and from the same input (its
`vqpipe.source` metadata says so); another tokenizer's part is removed at once, and temporaries
left by a killed run are removed, so nothing half-written or foreign is ever taken as complete.
A part whose footer cannot be read for an I/O error is redone but not removed. A run holds the
output (`output_lock`) from planning to its manifest: a second run on it refuses, naming the
first, instead of removing its temporaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import fsspec

from components.data import tokens as token_io
from components.data.tokenization import ShardTokens, part_names
from components.io import is_url
from components.tokenizers import Tokenizer
from components.tokenizers.tokenizer import CONFIG_FILE, WEIGHTS_FILE
from pipelines.corpus.job import CorpusJob, ShardWork
from pipelines.tracking import fetch_export

log = logging.getLogger("vqpipe.tokenize")


def resolve_tokenizer(spec: str, dest: str | Path) -> Path:
    """The local directory of the tokenizer `spec` names: an export directory as it is, or an
    MLflow model or artifact URI (`models:/name@alias`, `models:/name/3`, `runs:/id/tokenizer`)
    downloaded into `dest` (see `pipelines.tracking.fetch_export`)."""
    return fetch_export(spec, dest, "tokenizer")


def load_tokenizer_files(files: dict[str, bytes], device="cpu") -> Tokenizer:
    """A tokenizer from its export's files (as shipped to workers through Ray's object store)."""
    with tempfile.TemporaryDirectory(prefix="vqpipe-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return Tokenizer.load(tmp, device=device)


def _filesystem(output: str):
    fs, root = fsspec.core.url_to_fs(output)
    return fs, root.rstrip("/")


UNKNOWN = "unknown"  # a part whose footer could not be read for a reason that may pass (I/O)
FOOTER_ATTEMPTS = 3
LEFTOVER_AGE = 24 * 3600  # seconds: on object stores, a temporary this old is a killed run's


def _existing_parts(fs, root: str, listing: set[str], names: list[str], local: bool) -> dict:
    """Part name -> info for the parts of `names` already in the output (`listing`): its
    `PartInfo`, None when it is not a readable vqpipe part (corrupt, foreign), or UNKNOWN when
    reading its footer failed with an I/O error every time (NFS, an object store): such a part
    is redone, but never removed first. Removes leftover temporaries of killed runs (the caller
    holds the output's lock; on object stores, only temporaries older than LEFTOVER_AGE)."""
    for leftover in sorted(n for n in listing if n.startswith(".part-") and n.endswith(".tmp")):
        path = f"{root}/{leftover}"
        if local or _age(fs, path) > LEFTOVER_AGE:
            fs.rm(path)  # never taken for a part
    present = [n for n in names if n in listing]

    def info(name: str):
        for attempt in range(1, FOOTER_ATTEMPTS + 1):
            try:
                return name, token_io.part_info(f"{root}/{name}", filesystem=fs)
            except OSError as err:  # pyarrow's ArrowInvalid (a corrupt file) is no OSError
                if attempt == FOOTER_ATTEMPTS:
                    log.warning("cannot read the footer of %s (%s): redoing it, leaving it in place", name, err)
                    return name, UNKNOWN
                time.sleep(0.5 * attempt)
            except Exception as err:  # noqa: BLE001 - not a readable vqpipe part: redo it
                log.warning("existing %s is not a readable token part (%s): redoing it", name, err)
                return name, None

    with ThreadPoolExecutor(16) as pool:  # footers only; in parallel for object stores
        return dict(pool.map(info, present))


def _age(fs, path: str) -> float:
    """Seconds since the object was written; 0 when the store does not say."""
    try:
        info = fs.info(path)
    except OSError:
        return 0.0
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, int | float):
            return time.time() - float(value)
        if hasattr(value, "timestamp"):
            return time.time() - value.timestamp()
        with contextlib.suppress(ValueError):
            return time.time() - datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return 0.0


class OutputBusy(ValueError):
    """Another run is writing the same output."""


LOCK_FILE = ".vqpipe-tokenize.lock"


@contextlib.contextmanager
def output_lock(output: str, lock_file: str = LOCK_FILE) -> Iterator[None]:
    """Hold the output directory for one run: a second `vqpipe tokenize` (or tokenize stage) on
    it refuses at once, naming the holder, instead of removing the first one's temporaries.
    The lock is the kernel's (flock): a run that dies, even by kill -9, lets go of it. Object
    stores have no locks; there, temporaries are left alone until LEFTOVER_AGE old."""
    if is_url(output):
        yield
        return
    root = Path(output.removeprefix("file://"))
    root.mkdir(parents=True, exist_ok=True)
    path = root / lock_file
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputBusy(
                f"{output} is being written by another run ({holder}); wait for it to end, or give another output"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # the lock is on the file that is there (not one its holder just removed)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0
        )
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before letting go: whoever locks next creates a fresh file
        os.close(fd)


def _listing(fs, root: str) -> list[str]:
    """File names in the output directory (none when it does not exist yet)."""
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


@dataclass
class CorpusPlan:
    tokenizer: Tokenizer
    files: dict[str, bytes]  # the tokenizer's export, shipped to the workers
    done: dict[str, ShardTokens]  # input URL -> its complete part, kept
    todo: list[ShardWork]


def plan_corpus(job: CorpusJob) -> CorpusPlan:
    """Load the tokenizer and sort the inputs into complete parts (same tokenizer, same input:
    kept unless `overwrite`) and work to do. Reads only the existing parts' footers."""
    job.check()
    names = {url: (job.names or {}).get(url, url) for url in job.inputs}
    parts = part_names([names[url] for url in job.inputs])
    with tempfile.TemporaryDirectory(prefix="vqpipe-tokenizer-") as tmp:
        tokenizer_dir = resolve_tokenizer(job.tokenizer, tmp)
        files = {name: (tokenizer_dir / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    tokenizer = load_tokenizer_files(files)

    fs, root = _filesystem(job.output)
    fs.makedirs(root, exist_ok=True)
    listing = set(_listing(fs, root))  # one listing: on object stores every one is a request
    existing = _existing_parts(fs, root, listing, list(parts.values()), local=not is_url(job.output))
    done: dict[str, ShardTokens] = {}
    todo: list[ShardWork] = []
    other_tokenizer = 0
    for url in job.inputs:
        name, part = names[url], parts[names[url]]
        if part in existing:
            info = existing[part]
            if info is UNKNOWN:  # redone and replaced whole when done; kept until then
                todo.append(ShardWork(url, name, part))
                continue
            same = info is not None and info.fingerprint == tokenizer.fingerprint
            if same and not job.overwrite and info.source and info.source.get("input_shard") == name:
                src = info.source
                done[url] = ShardTokens(name, part, src["samples"], info.rows, src["rejects"])
                continue
            if not same:
                # Another tokenizer's part (or an unreadable file) goes now, not when its shard
                # is redone: if that fails, no part of the old tokenizer stays among the new.
                other_tokenizer += 1
                fs.rm(f"{root}/{part}")
        todo.append(ShardWork(url, name, part))
    if todo and token_io.MANIFEST in listing:
        fs.rm(f"{root}/{token_io.MANIFEST}")  # a manifest is there only while the output is finished
    log.info(
        "%d input shards: %d parts complete, %d to tokenize%s",
        len(job.inputs),
        len(done),
        len(todo),
        f" ({other_tokenizer} made by another tokenizer, removed, are redone)" if other_tokenizer else "",
    )
    ours = set(parts.values())
    stale = sorted(n for n in listing if n.startswith("part-") and n.endswith(".parquet") and n not in ours)
    if stale:
        log.warning(
            "%d parts in %s belong to no input of this job (e.g. %s); they are not in the manifest",
            len(stale),
            job.output,
            stale[0],
        )
    return CorpusPlan(tokenizer, files, done, todo)
