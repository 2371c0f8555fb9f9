"""Image grids for reports: (n, 3, H, W) in [0, 1] -> one PIL image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, upscale: int = 1) -> Image.Image:
    """Tile images row by row, `nrow` per row (default: square-ish), on a grey background."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = np.full((ncol * (h + padding) + padding, nrow * (w + padding) + padding, 3), 128, dtype=np.uint8)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(canvas)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    return img


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Image.Image:
    img = make_grid(images, nrow=nrow, upscale=upscale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img
