"""How good are generated images: FID, precision/recall in a feature space, class consistency.

Feature spaces:
- `inception`: Inception-v3 pool features (2048-d), the space published FIDs use, from a local
  weights file the user gives (`components.metrics.inception`); never downloaded.
- `tokenizer_encoder`: without Inception weights, the tokenizer's own encoder: per channel mean
  and standard deviation of its last feature map over positions. Always available, cheap, and
  sensitive to what the tokenizer can see; its values are NOT comparable with published FIDs or
  across tokenizers, and the metrics are labelled with the space they were computed in.

FID: the Fréchet distance between Gaussians fitted to the two sets of features (Heusel et al.,
2017). Precision/recall: Kynkäänniemi et al., 2019: a generated sample is "precise" when it
falls inside the k-NN ball of some real sample, a real sample is "recalled" when it falls
inside the k-NN ball of some generated sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FeatureMoments:
    """Running mean and covariance of feature rows (float64), a batch at a time: what FID needs,
    in O(d^2) memory whatever the number of rows. Sums are taken about the first batch's mean,
    which keeps the one-pass covariance free of cancellation."""

    def __init__(self):
        self.n = 0
        self.pivot = self.total = self.outer = None

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or not len(x):
            raise ValueError(f"features must be a non-empty (n, d) array, got shape {x.shape}")
        if self.pivot is None:
            self.pivot = x.mean(0)
            self.total = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != len(self.pivot):
            raise ValueError(f"features must all have the same d: {len(self.pivot)}, then {x.shape[1]}")
        centred = x - self.pivot
        self.n += len(x)
        self.total += centred.sum(0)
        self.outer += centred.T @ centred

    @property
    def mean(self) -> np.ndarray:
        return self.pivot + self.total / self.n

    @property
    def cov(self) -> np.ndarray:
        return (self.outer - np.outer(self.total, self.total) / self.n) / (self.n - 1)


def frechet_from_moments(a: FeatureMoments, b: FeatureMoments) -> float:
    """FID of two feature distributions: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).

    The trace of the matrix square root is computed as the sum of square roots of the
    eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD, so exact up to rounding), in float64."""
    if a.pivot is None or b.pivot is None or len(a.pivot) != len(b.pivot):
        raise ValueError("feature sets must be (n, d) with the same d")
    if a.n < 2 or b.n < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    s_a, s_b = np.atleast_2d(a.cov), np.atleast_2d(b.cov)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((a.mean - b.mean) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * trace_root)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets (n, d) and (m, d) (see `frechet_from_moments`)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (n, d) with the same d, got {a.shape} and {b.shape}")
    moments = []
    for x in (a, b):
        m = FeatureMoments()
        m.add(x)
        moments.append(m)
    return frechet_from_moments(*moments)


class FeatureStore:
    """Feature rows (n, d) as they come, as float32: in memory up to `budget_bytes`, past that
    spilled to a file in `directory` and read back memory-mapped, so precision/recall of a
    split of any size runs in bounded memory."""

    def __init__(self, budget_bytes: int, directory: str | Path):
        self.budget, self.directory = budget_bytes, Path(directory)
        self.held: list[np.ndarray] = []
        self.bytes = self.rows = 0
        self.dim: int | None = None
        self.file: Path | None = None

    def add(self, features: np.ndarray) -> None:
        x = np.ascontiguousarray(features, dtype=np.float32)
        self.dim = x.shape[1]
        self.rows += len(x)
        if self.file is None and self.bytes + x.nbytes <= self.budget:
            self.held.append(x)
            self.bytes += x.nbytes
            return
        if self.file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.file = self.directory / f"features-{id(self)}.f32"
            with open(self.file, "wb") as f:
                for held in self.held:
                    f.write(held.tobytes())
            self.held, self.bytes = [], 0
        with open(self.file, "ab") as f:
            f.write(x.tobytes())

    @property
    def spilled(self) -> bool:
        return self.file is not None

    def array(self) -> np.ndarray:
        """(n, d) float32: in memory, or a read-only memory map of the spilled file."""
        if self.file is not None:
            return np.memmap(self.file, dtype=np.float32, mode="r", shape=(self.rows, self.dim))
        return np.concatenate(self.held) if self.held else np.zeros((0, self.dim or 0), dtype=np.float32)


def _block(x: np.ndarray, start: int, size: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x[start : start + size], dtype=np.float64))


def _knn_radii(x: np.ndarray, k: int, block: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row, a block of rows against a block
    of columns at a time (memory: block^2 distances, not n^2)."""
    radii = torch.empty(len(x), dtype=torch.float64)
    for i in range(0, len(x), block):
        rows, best = _block(x, i, block), None
        for j in range(0, len(x), block):
            d = torch.cdist(rows, _block(x, j, block))
            candidates = d if best is None else torch.cat([best, d], dim=1)
            best = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[i : i + block] = best[:, k]  # k + 1 smallest: the row itself at distance 0 first
    return radii


def _covered(queries: np.ndarray, refs: np.ndarray, radii: torch.Tensor, block: int) -> float:
    """Share of `queries` inside the k-NN ball of some row of `refs`."""
    hits = 0
    for i in range(0, len(queries), block):
        q = _block(queries, i, block)
        hit = torch.zeros(len(q), dtype=torch.bool)
        for j in range(0, len(refs), block):
            hit |= (torch.cdist(q, _block(refs, j, block)) <= radii[None, j : j + block]).any(dim=1)
        hits += int(hit.sum())
    return hits / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN balls, computed in
    blocks: `real` and `fake` may be memory maps larger than memory."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    real_r, fake_r = _knn_radii(real, k, block), _knn_radii(fake, k, block)
    return _covered(fake, real, real_r, block), _covered(real, fake, fake_r, block)


@torch.no_grad()
def tokenizer_features(tokenizer, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(n, 3, H, W) in [0, 1] -> (n, 2C): per channel mean and std of the tokenizer encoder's
    last feature map (the `tokenizer_encoder` feature space)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(tokenizer.device, torch.float32) * 2.0 - 1.0
        h = tokenizer.model.encoder(x).float().flatten(2)
        out.append(torch.cat([h.mean(-1), h.std(-1)], dim=1).cpu())
    return torch.cat(out).numpy()


class SmallClassifier(nn.Module):
    """A few conv layers and a linear head: enough to tell the built-in shapes apart, trained in
    seconds on a CPU; the judge of class consistency."""

    def __init__(self, num_classes: int, width: int = 24):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2.0 - 1.0)


def fit_classifier(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], num_classes: int, *, steps: int = 300, seed: int = 0
) -> SmallClassifier:
    """A SmallClassifier trained for `steps` steps on a stream of (images in [0, 1], labels)
    batches (unlabelled rows, label -1, are skipped), with random flips: memory holds a batch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        x, y = x[y >= 0].float(), y[y >= 0]
        if not len(y):
            schedule.step()
            continue
        flip = torch.rand(len(y), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    return model


@torch.no_grad()
def classifier_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Share of the labelled rows of a stream of batches the classifier gets right (nan: none)."""
    model.eval()
    hits = total = 0
    for x, y in batches:
        x, y = x[y >= 0].float(), y[y >= 0]
        if len(y):
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return hits / total if total else float("nan")


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 300,
    seed: int = 0,
) -> tuple[SmallClassifier, float]:
    """`fit_classifier` on (images, labels) in memory, batches of 64 drawn at random from four
    fifths of them; returns the classifier and its accuracy on the held-out fifth (how far its
    verdict on samples can be trusted)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    n_test = max(1, len(images) // 5) if len(images) > 4 else 0
    test, train = order[:n_test], order[n_test:]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            pick = train[torch.randint(0, len(train), (64,), generator=gen)]
            yield images[pick], labels[pick]

    model = fit_classifier(batches(), num_classes, steps=steps, seed=seed)
    accuracy = classifier_accuracy(model, [(images[test], labels[test])]) if n_test else float("nan")
    return model, accuracy


@torch.no_grad()
def class_consistency(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Fraction of images the classifier assigns to the class they were generated for."""
    classifier.eval()
    hits = 0
    for start in range(0, len(images), batch_size):
        pred = classifier(images[start : start + batch_size].float()).argmax(1)
        hits += int((pred == labels[start : start + batch_size]).sum())
    return hits / max(len(images), 1)
