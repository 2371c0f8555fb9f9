"""Reading a file a source names, bounded: a regular file only, never more than a limit."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from components.data.corpus import printable
from components.data.limits import too_large


class FileTooLarge(OSError):
    pass


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most `max_bytes` (FileTooLarge beyond). Opened without
    following a link and without blocking (a FIFO put in a file's place since it was listed
    would otherwise wait forever), then checked to be a regular file before anything is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{printable(str(path))} is no longer a regular file")
        if info.st_size > max_bytes:
            raise FileTooLarge(too_large("file", info.st_size, max_bytes, "max_file_bytes"))
        return read_at_most(f, max_bytes)  # the file may have grown since fstat


def read_at_most(f, max_bytes: int) -> bytes:
    """All of an open binary stream, or FileTooLarge once it holds more than `max_bytes`."""
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(too_large("file", len(data), max_bytes, "max_file_bytes"))
    return data
