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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets (n, d) and (m, d): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).

    The trace of the matrix square root is computed as the sum of square roots of the
    eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD, so exact up to rounding), in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (n, d) with the same d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * trace_root)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN balls."""
    real_t, fake_t = (
        torch.as_tensor(np.asarray(real), dtype=torch.float64),
        torch.as_tensor(np.asarray(fake), dtype=torch.float64),
    )
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    real_r, fake_r = _knn_radii(real_t, k), _knn_radii(fake_t, k)
    d = torch.cdist(fake_t, real_t)  # (fake, real)
    precision = (d <= real_r[None, :]).any(dim=1).double().mean().item()
    recall = (d.T <= fake_r[None, :]).any(dim=1).double().mean().item()
    return precision, recall


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


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 300,
    seed: int = 0,
) -> tuple[SmallClassifier, float]:
    """A SmallClassifier trained on (images, labels) in [0, 1], with random flips; returns it and
    its accuracy on the held-out fifth (how far its verdict on samples can be trusted)."""
    batch_size, held_out = 64, 0.2
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    n_test = max(1, int(len(images) * held_out)) if len(images) > 4 else 0
    test, train = order[:n_test], order[n_test:]
    torch.manual_seed(seed)
    model = SmallClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (batch_size,), generator=gen)]
        x = images[batch].float()
        flip = torch.rand(len(batch), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), labels[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    accuracy = float("nan")
    if n_test:
        with torch.no_grad():
            accuracy = (model(images[test].float()).argmax(1) == labels[test]).float().mean().item()
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
