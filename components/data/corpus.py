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
import os
import signal
import subprocess
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import fsspec
from braceexpand import braceexpand

from components.data.limits import DEFAULT_LIMITS, ReadLimits, too_large
from components.processes import guarded

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


class ListCycle(ValueError):
    """An `@FILE` list that includes itself, directly or through other lists."""


def expand_inputs(spec: str | list[str], allow_pipe_in_lists: bool = False, list_globs: bool = True) -> list[str]:
    """The shard URLs a spec (or list of specs) names, in order, each once; raises ValueError
    when a glob or `@FILE` matches nothing, when an `@FILE` includes itself (`ListCycle`, naming
    the cycle) or when it holds a `pipe:` line and `allow_pipe_in_lists` is false: a list file
    is data, often written by someone else, and a `pipe:` line in it is a shell command.
    `list_globs=False` checks the specs and their `@FILE`s without listing any filesystem
    (globs are kept as they are): a quick check before the real expansion."""
    out: list[str] = []
    seen: set[str] = set()

    def add(url: str) -> int:
        key = _canonical(url)
        if key not in seen:
            seen.add(key)
            out.append(url)
        return 1

    def expand(specs: list[str], lists: tuple[Path, ...]) -> int:
        """Adds what `specs` name; returns how many inputs they named (repeats included)."""
        named = 0
        for item in specs:
            item = item.strip()
            if not item:
                continue
            if item.startswith("@"):
                named += expand_list(item, lists)
            elif item.startswith("pipe:"):
                named += add(item)
            else:
                for expanded in braceexpand(item):
                    if not _is_glob(expanded) or not list_globs:
                        named += add(expanded)
                        continue
                    matches = _glob(expanded)
                    if not matches:
                        raise ValueError(f"no input shards match {expanded!r}")
                    named += sum(add(match) for match in matches)
        return named

    def expand_list(item: str, lists: tuple[Path, ...]) -> int:
        listing = Path(item[1:]).expanduser()
        if not listing.is_file():
            raise ValueError(f"{item!r}: no such file of shard URLs")
        resolved = listing.resolve()
        if resolved in lists:
            cycle = " -> ".join(f"@{p}" for p in (*lists[lists.index(resolved) :], resolved))
            raise ListCycle(f"{item!r} includes itself: {cycle}")
        lines = [line.strip() for line in listing.read_text(errors="replace").splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        commands = [line for line in lines if line.startswith("pipe:")]
        if commands and not allow_pipe_in_lists:
            raise ValueError(
                f"{item!r} holds a pipe: command ({commands[0][:80]!r}); commands from a list file run "
                "only when allowed (vqpipe tokenize --allow-pipe, or shard.limits.allow_pipe_in_lists: true)"
            )
        named = expand(lines, (*lists, resolved))
        if not named:
            raise ValueError(f"{item!r} lists no shards")
        return named

    expand([spec] if isinstance(spec, str) else list(spec), ())
    return out


def _canonical(url: str) -> str:
    """One name per input: `file:///d/x.tar` and `/d/x.tar` are the same shard."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return url


class ShardUnreadable(Exception):
    """An input shard that cannot be read as a whole: missing, not a tar, truncated, or its
    `pipe:` command failed. Distinct from a bad sample inside a readable shard (a reject)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self):  # pickles whole across processes (Ray returns it to the driver)
        return type(self), (self.url, self.reason)


# Why a shard stopped being read (ShardUnreadable reasons, and why a `pipe:` command was killed).
TIMED_OUT = "reading the shard took longer than the shard timeout (shard_timeout)"
STOPPED = "the process was asked to stop"


class _Tail:
    """A read-only stream that remembers the last 512 bytes read (to check the tar's end) and
    gives up once the shard's deadline has passed."""

    def __init__(self, raw, url: str, deadline: float | None):
        self.raw, self.url, self.deadline = raw, url, deadline
        self.tail = b""
        self.size = 0
        self.empty_reads = 0

    def read(self, n: int = -1) -> bytes:
        if STOP.is_set():
            raise ShardUnreadable(self.url, STOPPED)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ShardUnreadable(self.url, TIMED_OUT)
        data = self.raw.read(n)
        if not data:
            # tarfile skips a member by reading up to its declared size, and goes on reading
            # after the end: a 1 KiB shard declaring an 8 GiB member took it half a million
            # empty reads. Past the end, a read that still wants data is a truncated shard.
            self.empty_reads += 1
            if self.empty_reads > 2 and n != 0:
                raise EOFError("unexpected end of data: a member runs past the end of the shard")
        self.size += len(data)
        self.tail = (self.tail + data)[-512:]
        return data

    def drain(self) -> None:
        while not self.empty_reads and self.read(1 << 20):
            pass


STDERR_TAIL = 4096  # bytes of a `pipe:` command's stderr kept for its error message

# Set when the process is asked to stop (`stop_reading`): every reader gives up at its next
# member, and every running `pipe:` command is killed, so threads reading shards end at once.
STOP = threading.Event()
_COMMANDS: set = set()  # the `_Command`s running now
_COMMANDS_LOCK = threading.Lock()


def stop_reading() -> None:
    """Make every shard being read in this process end now (see STOP)."""
    STOP.set()
    with _COMMANDS_LOCK:
        running = list(_COMMANDS)
    for command in running:
        command.kill(STOPPED)


class _Command:
    """A `pipe:` command's stdout as a stream. Its stderr is drained on a thread (a command that
    writes more than a pipe's buffer there can never block), a watchdog kills the command's whole
    process group when it writes nothing for `idle` seconds or runs past `deadline`, and
    `close()` always leaves no process behind."""

    def __init__(self, url: str, idle: float, deadline: float | None):
        self.url, self.idle, self.deadline = url, idle, deadline
        self.proc = subprocess.Popen(
            guarded(["/bin/sh", "-c", url[len("pipe:") :]]),  # SIGTERM when this process dies
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,  # read() returns what the command has written so far
            start_new_session=True,  # its own process group: killed whole, children included
        )
        self.stderr = bytearray()
        self.last_output = time.monotonic()
        self.killed_because: str | None = None
        self.done = threading.Event()
        self._drain = threading.Thread(target=self._read_stderr, daemon=True, name="pipe-stderr")
        self._drain.start()
        self._watch = threading.Thread(target=self._watchdog, daemon=True, name="pipe-watchdog")
        self._watch.start()
        with _COMMANDS_LOCK:
            _COMMANDS.add(self)
        if STOP.is_set():
            self.kill(STOPPED)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n if n > 0 else 1 << 20)
        if data:
            self.last_output = time.monotonic()
        return data or b""

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(1 << 16), b""):
            self.stderr += chunk
            del self.stderr[:-STDERR_TAIL]

    def _watchdog(self) -> None:
        while not self.done.wait(min(1.0, self.idle or 1.0)):
            now = time.monotonic()
            if self.idle and now - self.last_output > self.idle:
                self.kill(f"the command wrote nothing for {self.idle:g} s (pipe_idle_timeout)")
            elif self.deadline is not None and now > self.deadline:
                self.kill(TIMED_OUT)

    def kill(self, reason: str | None = None) -> None:
        if reason and self.killed_because is None and self.proc.poll() is None:
            self.killed_because = reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self, finished: bool) -> int:
        """Waits for the command (kills it first unless `finished`); its exit status."""
        if not finished:
            self.kill()
        try:
            code = self.proc.wait(timeout=self.idle or None)
        except subprocess.TimeoutExpired:  # stdout closed, but the command goes on
            self.kill(f"the command did not exit {self.idle:g} s after closing its output (pipe_idle_timeout)")
            code = self.proc.wait()
        self.kill()  # whatever it started in the background goes with it
        self.done.set()
        with _COMMANDS_LOCK:
            _COMMANDS.discard(self)
        self._drain.join(timeout=5)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code

    def error(self, code: int) -> str:
        if self.killed_because:
            return f"killed: {self.killed_because}"
        text = self.stderr.decode(errors="replace").strip()
        return f"command exited with status {code}: {text[-500:]}"


@contextlib.contextmanager
def _open(url: str, limits: ReadLimits = DEFAULT_LIMITS, deadline: float | None = None) -> Iterator:
    """A binary stream of the shard: a local path, any fsspec URL, or `pipe:COMMAND`."""
    if url.startswith("pipe:"):
        command = _Command(url, limits.pipe_idle_timeout, deadline)
        failure: BaseException | None = None
        finished = False
        try:
            yield command
            while command.read(1 << 20):  # let the command finish writing
                pass
            finished = True
        except GeneratorExit:  # the reader stopped early: the command's output is not wanted
            command.close(finished=False)
            raise
        except BaseException as err:  # reported below, after the command's own status
            failure = err
        code = command.close(finished)
        if command.killed_because:
            raise ShardUnreadable(url, command.error(code)) from failure
        if failure is None:
            if code != 0:
                raise ShardUnreadable(url, command.error(code))
            return
        # The reader failed: the command's own failure, when it had one, is the cause to report
        # (status -9 is ours: the reader stopped and the command was killed).
        if code not in (0, -signal.SIGKILL) and not isinstance(failure, KeyboardInterrupt | SystemExit):
            raise ShardUnreadable(url, command.error(code)) from failure
        raise failure

    with fsspec.open(url, "rb") as f:
        yield f


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's member naming: `dir/key.ext.more` -> (`dir/key`, `ext.more`); None for a
    name with no key or no extension (`.hidden`, `README`, `key.`)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1 :]


REJECT = "__reject__"  # a field of a sample `read_shard` yields only to say why it is unusable


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isfifo():
        return "a FIFO"
    if member.ischr() or member.isblk():
        return "a device"
    return f"of tar type {member.type!r}"


def read_shard(url: str, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[dict]:
    """The samples of one WebDataset tar shard, in order: `{"__key__", "__url__", ext: bytes}`.

    Reads as a stream (nothing is downloaded whole; a member is read only when it is within
    `limits.max_member_bytes`). Raises ShardUnreadable when the shard is missing, is not a tar,
    ends early, or takes longer than the limits allow: a truncated tar is caught both inside a
    member and between members (an uncompressed tar must end with zero blocks).

    What cannot be a sample is yielded too, with a `__reject__` reason, so that every member is
    accounted for: a member that is not a regular file (directories excepted: they hold nothing),
    one with no `key.extension` name, one over the size limit, a field repeated within a sample,
    and a key that comes back after other keys (the sample would merge with another)."""
    compressed = url.endswith((".gz", ".tgz", ".bz2", ".xz"))
    deadline = time.monotonic() + limits.shard_timeout if limits.shard_timeout else None
    try:
        with _open(url, limits, deadline) as raw:
            stream = _Tail(raw, url, deadline)
            current: dict | None = None
            done: set[str] = set()  # keys of the samples already yielded
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    # A streamed TarFile still lists every member it has read: forget them, or a
                    # shard's headers pile up in memory (about 1 KiB per member).
                    tar.members = []
                    if member.isdir():
                        continue
                    parts = _split_name(member.name)
                    reason = None
                    if not member.isfile():
                        reason = f"tar member {printable(member.name)} is {_kind(member)}, not a regular file"
                    elif parts is None:
                        reason = f"tar member {printable(member.name)} has no key.extension name"
                    if reason is not None:
                        yield {"__key__": printable(member.name), "__url__": url, REJECT: reason}
                        continue
                    key, ext = printable(parts[0]), parts[1].lower()
                    if current is not None and current["__key__"] != key:
                        yield _finished(current, done)
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    if member.size > limits.max_member_bytes:
                        reason = too_large(f"member {ext}", member.size, limits.max_member_bytes, "max_member_bytes")
                        current.setdefault(REJECT, reason)
                        continue  # tarfile skips the member's data without keeping it
                    if ext in current:
                        current.setdefault(REJECT, f"field {ext!r} appears twice in the sample")
                        continue
                    current[ext] = tar.extractfile(member).read()
            stream.drain()
            if not compressed and (stream.size == 0 or stream.tail.count(0) != len(stream.tail)):
                raise ShardUnreadable(url, "truncated tar: it ends without the end-of-archive blocks")
            if current is not None:
                yield _finished(current, done)
    except ShardUnreadable:
        raise
    except FileNotFoundError as err:
        raise ShardUnreadable(url, f"no such shard ({err})") from err
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, OverflowError) as err:
        text = str(err) or type(err).__name__
        if "unexpected end" in text or isinstance(err, EOFError):
            text = f"truncated tar: {text}"
        raise ShardUnreadable(url, text) from err


def _finished(sample: dict, done: set[str]) -> dict:
    """The sample, rejected when its key was already used earlier in the shard."""
    key = sample["__key__"]
    if key in done:
        sample.setdefault(REJECT, "duplicate key within the shard (it came back after other keys)")
    done.add(key)
    return sample


def printable(name: str) -> str:
    """A member or file name as text that can be written anywhere (JSON, tar headers, Parquet):
    bytes that are not UTF-8 shown as backslash escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
