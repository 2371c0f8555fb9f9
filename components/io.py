"""Atomic file writes: a file that exists under its final name is complete, and stays so through
a crash (synced before and after its rename); a directory is replaced as a unit."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import fsspec
import torch
from safetensors.torch import load_file


def fsync_path(path: str | Path) -> None:
    """Flush a file's, or a directory's entries', data to the disk (a rename is durable only once
    its directory is synced). Filesystems that cannot sync a directory are let be."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL: this filesystem has no fsync for it
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else set and
    restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path, default: int) -> int:
    """The permissions a replacement of `path` gets: those of the file or directory it replaces,
    else what a plain open() / mkdir() would give under the umask (temporary files are created
    0600 / 0700: renamed into place as they are, a model or a token part would be unreadable to
    a team mate or a service under another uid)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return default & ~_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` for a temporary file beside `path`, then rename it into place:
    synced to the disk first, and its directory after, so that a crash or power loss leaves the
    old file or the new one, whole, never an empty or partial one under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path, 0o666))
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


def replace_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Replace the directory `path` as a unit: `fill(staging)` writes the new contents into a
    staging directory beside it, which is synced and then swapped in (in one step on Linux; by
    two renames elsewhere, never leaving a mix of old and new files). A reader sees the old
    contents or the new, never a weights file of one with the config of the other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging-"))
    try:
        os.chmod(staging, _mode_for(path, 0o777))
        fill(staging)
        for file in staging.rglob("*"):
            fsync_path(file)
        fsync_path(staging)
        if not path.exists():
            os.replace(staging, path)
        elif _exchange(staging, path):
            shutil.rmtree(staging)  # now the old contents
        else:
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(path.parent)


def is_url(path: str | Path) -> bool:
    """A non-local fsspec URL (`s3://`, `memory://`, ...); `file://` and plain paths are local."""
    return "://" in str(path) and not str(path).startswith("file://")


def atomic_write_to(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a temporary file beside `path`, then renamed into place: `path` is a local
    path or any fsspec URL (on object stores the rename is a copy, so the object appears whole
    or not at all)."""
    path = str(path)
    if not is_url(path):

        def local(tmp: str) -> None:
            with open(tmp, "wb") as f:
                write(f)

        atomic_write(path.removeprefix("file://"), local)
        return

    fs, target = fsspec.core.url_to_fs(path)
    parent, name = target.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, target)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def load_state_file(path: str | Path, what: str) -> dict:
    """A state dict of tensors from a file a user handed in, never unpickling code: safetensors,
    or `torch.load(weights_only=True)` (a {"state_dict": ...} wrapper is unwrapped).
    FileNotFoundError / ValueError name `what` the file should have been."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path} (a local file; nothing is downloaded)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a state dict of tensors ({what})")
    return raw
