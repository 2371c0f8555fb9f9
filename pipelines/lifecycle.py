"""How a vqpipe process ends: on SIGTERM as on Ctrl-C, and never leaving its children behind.

- `exit_on_signals()`: SIGTERM and SIGHUP raise `Terminated` (a SystemExit, exit status
  128 + signal) in the main thread, as SIGINT raises KeyboardInterrupt, so every `finally` and
  context manager runs: `pipe:` commands are killed, Ray actors and local clusters shut down,
  temporary files removed, locks let go. Python's default for SIGTERM is to die on the spot.
- `die_with_parent()` and `guarded(cmd)` (components.processes): on Linux, a process gets
  SIGTERM when its parent dies, even by kill -9, so a stage never outlives the `dvc repro`
  that started it, nor `dvc repro` the `vqpipe run` that started it.
- `watch_ancestors()`: the same for a parent or grandparent (a stage may run under DVC's
  shell), and for the `vqpipe run` named in the environment (`owner_env`).
- `stop_group(proc)`: SIGTERM to a child's process group, SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from components.processes import die_with_parent, guarded

GRACE = 5.0  # seconds a child's process group has after SIGTERM before SIGKILL


class Terminated(SystemExit):
    """The process was asked to stop (SIGTERM, SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _raise(signum, frame) -> None:
    raise Terminated(signum)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP raise Terminated in the main thread (see the module doc)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


def _identity(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None when it is gone (or a zombie): the start
    time tells a process from a later one given the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def watch_ancestors(levels: int = 2, every: float = 1.0) -> None:
    """SIGTERM to this process when its parent or grandparent ends (Linux). A stage that DVC
    starts through a shell has the shell for a parent; the parent-death signal of
    `die_with_parent` never fires when `dvc repro` dies and the shell stays: so the stage watches
    two levels up, once a second, from a daemon thread."""
    if _identity(os.getpid()) is None:  # no /proc (not Linux): nothing to watch with
        return
    chain, pid = [], os.getpid()
    for _ in range(levels):
        me = _identity(pid)
        if me is None or me[0] <= 1:
            break
        pid = me[0]
        ident = _identity(pid)
        if ident is None:
            break
        chain.append((pid, ident[1]))
    owner = os.environ.get(OWNER_ENV, "")  # the `vqpipe run` this process works for, if any
    if owner.count(":") == 1:
        pid, started = owner.split(":")
        chain.append((int(pid), started))
    if not chain:
        return

    def watch() -> None:
        while True:
            for pid, started in chain:
                ident = _identity(pid)
                if ident is None or ident[1] != started:
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            time.sleep(every)

    threading.Thread(target=watch, daemon=True, name="watch-ancestors").start()


OWNER_ENV = "VQPIPE_OWNER_PROCESS"  # "pid:start time" of the `vqpipe run` that started a stage


def owner_env() -> dict[str, str]:
    """What a child started by this process inherits so that `watch_ancestors` in a stage also
    watches this process: a stage still starting up when `vqpipe run` dies learns of it too."""
    ident = _identity(os.getpid())
    return {OWNER_ENV: f"{os.getpid()}:{ident[1]}"} if ident else {}


def stop_group(proc: subprocess.Popen, grace: float = GRACE) -> None:
    """End a child started with `start_new_session=True` and everything in its process group:
    SIGTERM, then SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


__all__ = ["Terminated", "die_with_parent", "exit_on_signals", "guarded", "owner_env", "stop_group", "watch_ancestors"]
