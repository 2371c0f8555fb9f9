"""Built-in procedural dataset: coloured shapes on varied backgrounds, labelled by shape and
captioned with what was drawn ("a red triangle on a white background").

Deterministic by (seed, index): image i is the same whatever the order or number generated,
so sharding can run in parallel partitions and still produce identical shards. Shape, colours,
size and position are drawn independently of each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "cyan", "white", "black")
GRADIENT_SHARE = 0.3
NATIVE_SIZE = 32
_SUPERSAMPLE = 4  # render at 4x and box-downsample for anti-aliased edges


def _background(rng: np.random.Generator, n: int, colours: np.ndarray) -> tuple[np.ndarray, bool]:
    """(n, n, 3) float in [0, 1]: a solid colour or a linear gradient between two colours; and
    whether it is a gradient."""
    a, b = colours
    if rng.random() >= GRADIENT_SHARE:
        return np.broadcast_to(a, (n, n, 3)).copy(), False
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    return a * (1 - t) + b * t, True


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


@dataclass(frozen=True)
class Drawing:
    """One image of the dataset and what was drawn on it: the class, the shape's palette
    colour, the background's one or two (a gradient from the first to the second)."""

    image: Image.Image
    label: int
    colour: int  # index into PALETTE / COLOUR_NAMES
    background: tuple[int, ...]  # one index (solid) or two (gradient)

    @property
    def caption(self) -> str:
        return caption(self.label, self.colour, self.background)


def caption(label: int, colour: int, background: tuple[int, ...]) -> str:
    """ "a red triangle on a white background", or "... on a white to black gradient"."""
    thing = f"a {COLOUR_NAMES[colour]} {CLASSES[label]}"
    if len(background) == 1:
        return f"{thing} on a {COLOUR_NAMES[background[0]]} background"
    return f"{thing} on a {COLOUR_NAMES[background[0]]} to {COLOUR_NAMES[background[1]]} gradient"


def draw(index: int, seed: int = 0) -> Drawing:
    """Image `index` of the dataset with this seed (32x32 RGB) and what is on it."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    n = NATIVE_SIZE * _SUPERSAMPLE
    # Three distinct palette colours: the shape's never matches the background's.
    colour, *background = (int(i) for i in rng.choice(len(PALETTE), 3, replace=False))
    canvas, gradient = _background(rng, n, PALETTE[background])
    r = rng.uniform(0.22, 0.36) * n
    cx, cy = rng.uniform(r, n - r, 2)
    mask = _mask(CLASSES[label], n, cx, cy, r)
    canvas = np.where(mask[..., None], PALETTE[colour], canvas)
    small = canvas.reshape(NATIVE_SIZE, _SUPERSAMPLE, NATIVE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = Image.fromarray((small * 255 + 0.5).astype(np.uint8), "RGB")
    return Drawing(image, label, colour, tuple(background) if gradient else (background[0],))


def render(index: int, seed: int = 0) -> tuple[Image.Image, int]:
    """Image `index` of the dataset with this seed: (32x32 RGB image, class id)."""
    drawing = draw(index, seed)
    return drawing.image, drawing.label


SOLID_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")
BORDER = 1  # pixels of the image's edge whose colour is taken as the background's
FOREGROUND_DISTANCE = 0.25  # RGB distance (0-1 scale) from the background that counts as drawn on it
MIN_FOREGROUND = 0.02  # share of the pixels a shape covers at least (the smallest covers ~5%)


def parse_caption(text: str) -> tuple[int, int, int] | None:
    """(class, colour, background colour) of a solid-background caption of this dataset
    ("a red triangle on a white background"); None for any other text (gradients included:
    their colours are not one colour to measure)."""
    match = SOLID_CAPTION.match(text.strip())
    if not match:
        return None
    colour, shape, background = match.groups()
    if shape not in CLASSES or colour not in COLOUR_NAMES or background not in COLOUR_NAMES:
        return None
    return CLASSES.index(shape), COLOUR_NAMES.index(colour), COLOUR_NAMES.index(background)


def _nearest(colour: np.ndarray) -> int:
    return int(np.argmin(((PALETTE - colour) ** 2).sum(axis=1)))


def measure_colours(image: np.ndarray) -> tuple[int, int]:
    """(shape colour, background colour) of an image as palette indices, measured: the
    background is the median colour of the image's edge, the shape the median of the pixels
    far from it; each is the nearest palette colour. The shape's is -1 when almost nothing is
    drawn. `image`: (3, H, W) or (H, W, 3) floats in [0, 1], or uint8."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"an image must be (3, H, W) or (H, W, 3), got shape {x.shape}")
    if x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.transpose(1, 2, 0)
    if np.asarray(image).dtype == np.uint8:
        x = x / 255.0
    edge = np.concatenate([x[:BORDER].reshape(-1, 3), x[-BORDER:].reshape(-1, 3)])
    edge = np.concatenate([edge, x[:, :BORDER].reshape(-1, 3), x[:, -BORDER:].reshape(-1, 3)])
    background = np.median(edge, axis=0)
    far = np.sqrt(((x - background) ** 2).sum(axis=-1)) > FOREGROUND_DISTANCE
    if far.mean() < MIN_FOREGROUND:
        return -1, _nearest(background)
    return _nearest(np.median(x[far], axis=0)), _nearest(background)
