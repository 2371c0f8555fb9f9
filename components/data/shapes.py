"""Built-in procedural dataset: coloured shapes on varied backgrounds, labelled by shape.

Deterministic by (seed, index): image i is the same whatever the order or number generated,
so sharding can run in parallel partitions and still produce identical shards.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "triangle", "cross")
# A palette of well-separated colours: varied images whose colours a small codebook can name
# exactly, so tokens (and a prior over them) capture shape rather than colour noise.
PALETTE = np.array(
    [
        (0.90, 0.10, 0.10),
        (0.10, 0.70, 0.20),
        (0.15, 0.30, 0.90),
        (0.95, 0.85, 0.10),
        (0.60, 0.15, 0.75),
        (0.05, 0.75, 0.80),
        (0.95, 0.95, 0.95),
        (0.10, 0.10, 0.10),
    ]
)
GRADIENT_SHARE = 0.3
NATIVE_SIZE = 32
_SUPERSAMPLE = 4  # render at 4x and box-downsample for anti-aliased edges


def _background(rng: np.random.Generator, n: int, colours: np.ndarray) -> np.ndarray:
    """(n, n, 3) float in [0, 1]: a solid colour or a linear gradient between two colours."""
    a, b = colours
    if rng.random() >= GRADIENT_SHARE:
        return np.broadcast_to(a, (n, n, 3)).copy()
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    return a * (1 - t) + b * t


def _mask(shape: str, n: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Upright shapes: position, size and colours vary, orientation does not, so that a small
    prior trained for minutes on a CPU can learn what each class looks like."""
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    u, v = xx - cx, yy - cy
    if shape == "circle":
        return u**2 + v**2 <= r**2
    if shape == "square":
        half = r * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":
        # Equilateral, pointing up, centroid at the origin, circumradius r.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            theta = 2 * np.pi * k / 3 + np.pi / 2
            inside &= np.cos(theta) * u + np.sin(theta) * v <= r / 2
        return inside
    if shape == "cross":
        arm = r * 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(index: int, seed: int = 0) -> tuple[Image.Image, int]:
    """Image `index` of the dataset with this seed: (32x32 RGB image, class id)."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    n = NATIVE_SIZE * _SUPERSAMPLE
    # Three distinct palette colours: the shape's never matches the background's.
    colour, *background = PALETTE[rng.choice(len(PALETTE), 3, replace=False)]
    canvas = _background(rng, n, np.array(background))
    r = rng.uniform(0.22, 0.36) * n
    cx, cy = rng.uniform(r, n - r, 2)
    mask = _mask(CLASSES[label], n, cx, cy, r)
    canvas = np.where(mask[..., None], colour, canvas)
    small = canvas.reshape(NATIVE_SIZE, _SUPERSAMPLE, NATIVE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray((small * 255 + 0.5).astype(np.uint8), "RGB"), label
