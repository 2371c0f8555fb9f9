"""One pipeline run at a time per project: the project lock.

`vqpipe run` and scheduled flow runs hold it from before their first stage to after their last;
a second run waits for it (saying for whom) or, told not to wait, fails with `ProjectBusy`
naming the holder. The lock is the kernel's (`flock` on `.dvc/tmp/vqpipe-run.lock`): a run that
dies, even by kill -9, lets go of it, and the next run says whose lock it took over. Only
`vqpipe` takes it: `dvc exp run` in a temporary workspace or a queue worker runs stages, not
`vqpipe run`, and so never waits on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

log = logging.getLogger("vqpipe.lock")

LOCK_FILE = Path(".dvc") / "tmp" / "vqpipe-run.lock"
POLL_SECONDS = 0.5
_held: dict[Path, list] = {}  # path -> [fd, depth, holder]: the lock is reentrant within this process


class ProjectBusy(RuntimeError):
    """Another run holds the project lock (and this one was told not to wait)."""

    def __init__(self, repo: Path, holder: dict):
        self.holder = holder
        super().__init__(f"another pipeline run holds {repo}: {describe(holder)}")


def describe(holder: dict) -> str:
    """The holder in words: `pid 123 on host, flow run 'x' (id), since 2026-11-29 10:00:00`."""
    if not holder:
        return "a run that has not written its name yet"
    parts = [f"pid {holder.get('pid')} on {holder.get('host')}"]
    if holder.get("flow_run_name") or holder.get("flow_run_id"):
        parts.append(f"flow run {holder.get('flow_run_name') or '?'} ({holder.get('flow_run_id') or '?'})")
    if holder.get("command"):
        parts.append(f"`{holder['command']}`")
    parts.append(f"since {holder.get('since', '?')}")
    return ", ".join(parts)


def read_holder(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        holder = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        holder = {"pid": "?", "host": "?", "since": "?", "note": raw[:200]}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int, holder: dict) -> None:
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


@contextlib.contextmanager
def project_lock(
    repo: str | Path,
    wait: bool = True,
    command: str = "",
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[dict]:
    """Hold `repo`'s project lock for the block; yields the holder record (update it with
    `note_flow_run`). Reentrant in one process: the CLI takes it before Prefect starts, and the
    flow it starts takes it again. `wait=False`: ProjectBusy at once when another run holds it."""
    path = (Path(repo).resolve() / LOCK_FILE).resolve()
    if path in _held:
        _held[path][1] += 1
        try:
            yield _held[path][2]
        finally:
            _held[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _acquire(fd, Path(repo), wait, on_wait or log.info)
        left = read_holder(fd)
        if left:  # a clean release empties the file: what is left is a killed run's
            log.warning("took over the project lock left by a run that ended without letting go: %s", describe(left))
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "command": command,
        }
        _write_holder(fd, holder)
        _held[path] = [fd, 1, holder]
        try:
            yield holder
        finally:
            del _held[path]
            os.ftruncate(fd, 0)  # before letting go: an empty file means it was let go of cleanly
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def note_flow_run(repo: str | Path, flow_run_id: str, flow_run_name: str) -> None:
    """Name the Prefect flow run in the lock this process holds, for whoever waits on it."""
    path = (Path(repo).resolve() / LOCK_FILE).resolve()
    if path in _held:
        fd, _, holder = _held[path]
        holder.update(flow_run_id=flow_run_id, flow_run_name=flow_run_name)
        _write_holder(fd, holder)


def current_holder(repo: str | Path) -> dict | None:
    """Who holds `repo`'s lock now (None: nobody)."""
    path = Path(repo).resolve() / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(fd)
        return None
    finally:
        os.close(fd)


def _acquire(fd: int, repo: Path, wait: bool, on_wait: Callable[[str], None]) -> None:
    said = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = read_holder(fd)
        if not wait:
            raise ProjectBusy(repo, holder)
        if holder != said:  # once per holder, not once per poll
            on_wait(f"waiting for the project lock of {repo}: held by {describe(holder)}")
            said = holder
        time.sleep(POLL_SECONDS)
