"""Tokenizer architectures side by side: VQ-VAE, VQ-VAE-2 and VQ-GAN trained with the default
settings on the built-in shapes data. Prints a table (not a timed test).

    .venv/bin/python benchmarks/architectures.py [--steps 600] [--images 16000]

Per architecture: tokens per image, validation PSNR and SSIM (all validation images, through the
exported tokenizer), codebook usage (mean over tiers), the stage's steps/s. VQ-GAN runs without
LPIPS (no weights file here) and its discriminator starts halfway.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import shapes_project, sibling
from components.config import parse_params
from components.data.shards import load_split, to_float
from components.metrics import psnr, ssim
from components.tokenizers import Tokenizer
from pipelines import train_tokenizer

ARCHS = {
    "vqvae": {},
    "vqvae2 (top 4x4 + bottom 8x8)": {"arch": "vqvae2"},
    "vqgan (l1 + hinge GAN)": {"arch": "vqgan", "recon_loss": "l1"},
    "vqgan (l2 + hinge GAN, LeCAM 0.001)": {"arch": "vqgan", "vqgan": {"lecam_weight": 0.001}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--images", type=int, default=16000)
    args = parser.parse_args()
    logging.disable(logging.INFO)

    base = shapes_project(args.images, "vqpipe-bench-archs-")
    val = to_float(load_split(base.shards, "val")[0])

    print(
        f"\n## Architectures: default settings, {args.steps} steps, built-in shapes ({len(val):,} validation images)\n"
    )
    print("| arch | tokens/image | parameters | val PSNR | val SSIM | codebook usage | steps/s |")
    print("|---|---|---|---|---|---|---|")
    for name, options in ARCHS.items():
        paths = sibling(base, re.sub(r"[^a-z0-9]+", "_", name))
        disc = {"disc_start": args.steps // 2, **options.get("vqgan", {})}
        raw = {
            "train_tokenizer": {
                **options,
                "vqgan": disc,
                "steps": args.steps,
                "val_every": args.steps,
                "checkpoint_dir": str(paths.root / "checkpoints"),
            }
        }
        cfg = parse_params(raw).train_tokenizer
        result = train_tokenizer.run(cfg, paths)
        tok = Tokenizer.load(paths.tokenizer)
        with torch.no_grad():
            recon = torch.cat([tok.reconstruct(val[i : i + 256]) for i in range(0, len(val), 256)])
        params = sum(p.numel() for p in tok.model.parameters())
        print(
            f"| {name} | {tok.num_tokens} | {params / 1e3:.0f}k | {psnr(recon, val).mean().item():.2f} dB | "
            f"{ssim(recon, val).mean().item():.3f} | {result.metrics['train_codebook_usage']:.1f}% | "
            f"{result.metrics['steps_per_second']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
