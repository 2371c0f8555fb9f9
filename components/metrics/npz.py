"""Images as ADM-style `.npz` files: one uint8 array `arr_0` of shape (n, H, W, 3), what the
reference evaluation suites (ADM's `evaluator.py`, and the FID/IS scripts built on it) read.

Written a batch at a time: the pixels go to a scratch file as they come, and `close` streams
them into the archive behind the header (whose shape needs the final count), so memory is one
batch whatever the number of images. The archive appears at its path only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from components.io import atomic_write
from components.metrics.reconstruction import to_uint8

ARRAY = "arr_0"
COPY_CHUNK = 16 << 20


class NpzWriter:
    """`add` (b, 3, H, W) images, floats in [0, 1] (rounded to the nearest uint8) or uint8;
    `close` writes `path`. Usable as a context manager (nothing is written if it raises)."""

    def __init__(self, path: str | Path, scratch: str | Path | None = None):
        self.path = Path(path)
        self.count = 0
        self.shape: tuple[int, ...] | None = None
        fd, name = tempfile.mkstemp(prefix="vqpipe-npz-", suffix=".u8", dir=scratch)
        self._raw = os.fdopen(fd, "wb")
        self._raw_path = Path(name)

    def add(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (b, 3, H, W), got shape {tuple(images.shape)}")
        pixels = images if images.dtype == torch.uint8 else to_uint8(images)
        nhwc = pixels.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        if self.shape is None:
            self.shape = nhwc.shape[1:]
        elif nhwc.shape[1:] != self.shape:
            raise ValueError(f"images must all be {self.shape} (H, W, C), got {nhwc.shape[1:]}")
        self._raw.write(nhwc.tobytes())
        self.count += len(nhwc)

    def close(self) -> Path:
        self._raw.close()
        try:
            shape = (self.count, *(self.shape or (0, 0, 3)))
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}

            def write(tmp: str) -> None:
                with (
                    zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
                    archive.open(f"{ARRAY}.npy", "w", force_zip64=True) as member,
                    open(self._raw_path, "rb") as raw,
                ):
                    np.lib.format.write_array_header_2_0(member, header)
                    shutil.copyfileobj(raw, member, COPY_CHUNK)

            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, write)
        finally:
            self._raw_path.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self._raw.close()
        self._raw_path.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
