"""Real photographs for the codebook benchmarks: scikit-image's bundled colour photos (in its
wheel: nothing is downloaded), cut into 32-px patches. Whole photos are held out for validation,
so no validation patch overlaps a training one.

Needs the benchmark extra: `make bench-deps` (scikit-image and
vector-quantize-pytorch; never runtime dependencies).

`train_on_photos` trains the project's tokenizer step (components/tokenizers/training.py) on
random training patches and scores it on every validation patch: PSNR on the uint8-rounded
reconstructions, codebook usage and perplexity of the validation tokens.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.config import TrainTokenizerConfig
from components.metrics import psnr
from components.metrics.reconstruction import as_uint8_images
from components.quantizers.base import usage_stats
from components.tokenizers.tokenizer import build_model, export_config
from components.tokenizers.training import TokenizerStep

PATCH = 32
# Colour photographs in scikit-image's wheel. The two motorcycle views are one scene: both train.
TRAIN_PHOTOS = (
    "astronaut.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
)
VAL_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")


def _photo(name: str) -> np.ndarray:
    import skimage.data  # noqa: PLC0415 (benchmark-only dependency)

    path = Path(skimage.data.__file__).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scikit-image's bundled photo is missing (make bench-deps)")
    return np.asarray(Image.open(path).convert("RGB"))


@dataclass
class Photos:
    train: list[np.ndarray]  # whole photos (H, W, 3) uint8, cropped at random
    val: torch.Tensor  # (n, 3, PATCH, PATCH) uint8: every non-overlapping patch of the held-out photos

    def __post_init__(self):
        areas = np.array([p.shape[0] * p.shape[1] for p in self.train], dtype=np.float64)
        self.weights = areas / areas.sum()  # photos are drawn by area

    def batch(self, size: int, generator: np.random.Generator) -> torch.Tensor:
        """`size` random training patches (b, 3, PATCH, PATCH) uint8, photos drawn by area."""
        which = generator.choice(len(self.train), size=size, p=self.weights)
        out = np.empty((size, PATCH, PATCH, 3), dtype=np.uint8)
        for i, w in enumerate(which):
            photo = self.train[w]
            y = generator.integers(0, photo.shape[0] - PATCH + 1)
            x = generator.integers(0, photo.shape[1] - PATCH + 1)
            out[i] = photo[y : y + PATCH, x : x + PATCH]
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


@functools.cache
def load_photos() -> Photos:
    val = []
    for name in VAL_PHOTOS:
        photo = _photo(name)
        rows, cols = photo.shape[0] // PATCH, photo.shape[1] // PATCH
        grid = photo[: rows * PATCH, : cols * PATCH].reshape(rows, PATCH, cols, PATCH, 3)
        val.append(grid.transpose(0, 2, 4, 1, 3).reshape(-1, 3, PATCH, PATCH))
    return Photos([_photo(n) for n in TRAIN_PHOTOS], torch.from_numpy(np.concatenate(val)))


@dataclass
class Result:
    psnr: float  # dB, uint8-rounded reconstructions of the validation patches
    usage: float  # % of the codebook the validation tokens use
    perplexity: float
    seconds: float


def train_on_photos(
    cfg: TrainTokenizerConfig,
    photos: Photos,
    seed: int,
    quantizer: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> Result:
    """Train `cfg`'s tokenizer (fp32) for `cfg.steps` steps of `cfg.batch_size` random patches
    on `device`; `quantizer` replaces the model's own (the reference implementation) before the
    optimizer is built. Seeded: same seed, same initial weights and batches."""
    torch.manual_seed(seed)
    model = build_model(export_config(cfg, PATCH))
    if quantizer is not None:
        model.quantizer = quantizer
    device = torch.device(device)
    model = model.to(device, memory_format=torch.channels_last)
    step = TokenizerStep(cfg, model, device, None)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    model.train()
    for n in range(1, cfg.steps + 1):
        step.step(photos.batch(cfg.batch_size, rng), n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return evaluate(step.trained_model, photos.val, codebook_size(cfg), seconds)


def codebook_size(cfg: TrainTokenizerConfig) -> int:
    q = cfg.quantizer
    return getattr(q, "codebook_size", None) or math.prod(getattr(q, "levels", None) or [1])


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, size: int, seconds: float) -> Result:
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(size, dtype=torch.long)
    total = 0.0
    for start in range(0, len(val), 256):
        x = val[start : start + 256].float().div(255.0).to(device)
        out = model(x * 2.0 - 1.0)
        recon = as_uint8_images((out.reconstruction + 1.0) / 2.0)
        total += psnr(recon, x).sum().item()
        for indices in out.indices.values():
            counts += torch.bincount(indices.reshape(-1).cpu(), minlength=size)[:size]
    stats = usage_stats(counts)
    return Result(total / len(val), stats["codebook_usage"].item(), stats["perplexity"].item(), seconds)


def run_in_processes(fn: Callable, tasks: Iterable, jobs: int) -> Iterator:
    """`fn(task)` for each task, results in task order: in this process (`jobs` 1) or in `jobs`
    spawned processes (CUDA needs spawn), each with its share of the CPU threads. Runs on one GPU
    this way overlap one run's Python and kernel launches with another's kernels."""
    if jobs <= 1:
        yield from map(fn, tasks)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        yield from pool.map(fn, tasks)
