"""Atomic file writes: a file that exists under its final name is complete."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import fsspec
import torch
from safetensors.torch import load_file


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` for a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
