"""Our vector quantizer against vector-quantize-pytorch's `VectorQuantize`, in the same model on
real photographs (benchmarks/photos.py: scikit-image's colour photos cut into 32-px patches,
whole photos held out). Prints a table (not a timed test).

    make bench-deps        # scikit-image, vector-quantize-pytorch
    .venv/bin/python benchmarks/codebook_quality.py [--steps 1500] [--seeds 0 1] [--sizes 128 1024 16384]
    .venv/bin/python benchmarks/codebook_quality.py --variants reference,default   # a subset
    .venv/bin/python benchmarks/codebook_quality.py --device cuda --jobs 8   # 8 runs at once on one GPU

Every run: the default tokenizer of params.yaml (compact VQ-VAE, 32-px patches -> 8x8 tokens,
Adam 2e-3, batch 64), fp32 on the CPU, the same seed giving the same initial encoder/decoder
weights and the same batches. The reference is `VectorQuantize(decay=0.99, commitment_weight=0.25,
kmeans_init=True, threshold_ema_dead_code=2)` with its other defaults (rotation trick on) in
place of our quantizer. Validation: every patch of the held-out photos; PSNR on the uint8-
rounded reconstructions, codebook usage and perplexity of their tokens. Means over the seeds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from torch import nn

from benchmarks.photos import PATCH, load_photos, run_in_processes, train_on_photos
from components.config import parse_params
from components.quantizers.base import QuantizerOutput, code_counts, usage_stats

# Rows: key -> (name, quantizer options over params.yaml's `vq`; None: the reference).
ROWS = {
    "reference": ("reference: VectorQuantize", None),
    "default": ("ours: default", {}),
    "rotation": ("ours + rotation trick", {"rotation_trick": True}),
    "threshold": ("ours + EMA-count threshold 2", {"dead_code_threshold": 2.0}),
    "threshold0.1": ("ours + EMA-count threshold 0.1", {"dead_code_threshold": 0.1}),
    "threshold0.5": ("ours + EMA-count threshold 0.5", {"dead_code_threshold": 0.5}),
    "restart25": ("ours, restart after 25 unused steps", {"restart_after_steps": 25}),
    "kmeans8": ("ours, k-means over 8 batches", {"kmeans_init_batches": 8}),
    "rotation+threshold": ("ours + rotation trick + threshold 2", {"rotation_trick": True, "dead_code_threshold": 2.0}),
    "entropy": ("ours + entropy loss 0.01", {"entropy_loss_weight": 0.01}),
    "simvq": ("ours, SimVQ (frozen codes, learned map)", {"ema": False, "simvq": True}),
}


class ReferenceVQ(nn.Module):
    """vector-quantize-pytorch's VectorQuantize behind our quantizer interface (channels-last
    (b, h, w, d) in, QuantizerOutput out), for training and validation only."""

    tokens_per_position = 1

    def __init__(self, dim: int, codebook_size: int, decay: float, beta: float):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize  # noqa: PLC0415 (benchmark-only)

        self.codebook_size = codebook_size
        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            decay=decay,
            commitment_weight=beta,
            kmeans_init=True,
            threshold_ema_dead_code=2,
        )

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, h, w, d = z.shape
        quantized, indices, loss = self.vq(z.reshape(b, h * w, d))
        stats = usage_stats(code_counts(indices, self.codebook_size, reduce=False))
        return QuantizerOutput(quantized.view_as(z), indices.view(b, h, w), loss.sum(), stats)


def _config(steps: int, size: int, overrides: dict):
    quantizer = {"type": "vq", "codebook_size": size, **overrides}
    raw = {"train_tokenizer": {"steps": steps, "precision": "fp32", "quantizer": quantizer}}
    return parse_params(raw).train_tokenizer


def _train(task: tuple[int, str, int, int, str]):
    """One run: (codebook size, row key, seed, steps, device) -> Result."""
    size, key, seed, steps, device = task
    overrides = ROWS[key][1]
    cfg = _config(steps, size, overrides or {})
    reference = None
    if overrides is None:
        q = cfg.quantizer
        reference = ReferenceVQ(cfg.latent_dim, size, q.decay, q.beta)
    return train_on_photos(cfg, load_photos(), seed, reference, torch.device(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 1024, 16384])
    parser.add_argument("--variants", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    photos = load_photos()
    print(f"photos: {len(photos.train)} training photos, {len(photos.val)} validation patches of {PATCH} px")
    keys = args.variants.split(",")
    print(f"\n{args.steps} steps, seeds {args.seeds}, {args.device}, {args.jobs} at once")
    print("means over seeds (per-seed PSNR and usage in brackets)\n")
    print("| quantizer | codes | val PSNR (dB) | usage | perplexity | s/run |")
    print("|---|---|---|---|---|---|")
    tasks = [(size, key, seed, args.steps, args.device) for size in args.sizes for key in keys for seed in args.seeds]
    results = run_in_processes(_train, tasks, args.jobs)
    for size in args.sizes:
        for key in keys:
            runs = [next(results) for _ in args.seeds]
            psnrs = ", ".join(f"{r.psnr:.2f}" for r in runs)
            usages = ", ".join(f"{r.usage:.1f}" for r in runs)
            print(
                f"| {ROWS[key][0]} | {size} | {statistics.mean(r.psnr for r in runs):.2f} ({psnrs}) "
                f"| {statistics.mean(r.usage for r in runs):.1f}% ({usages}) "
                f"| {statistics.mean(r.perplexity for r in runs):.0f} "
                f"| {statistics.mean(r.seconds for r in runs):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
