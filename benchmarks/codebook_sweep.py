"""How each quantizer scales with its codebook: 2^8, 2^10, 2^12 and 2^14 codes, in the default
tokenizer on real photographs (benchmarks/photos.py). Prints a table (not a timed test).

    make bench-deps        # scikit-image, vector-quantize-pytorch
    .venv/bin/python benchmarks/codebook_sweep.py [--steps 600] [--seed 0] [--device cpu|cuda]
    .venv/bin/python benchmarks/codebook_sweep.py --methods fsq,lfq --sizes 8 10   # a subset

Methods:
- plain VQ: the codebook learned by gradient (van den Oord et al. 2017), no k-means, no restart,
  straight-through gradients (codes start at random encoder outputs of the first batch);
- default VQ: `vq` as params.yaml sets it;
- FSQ at the FSQ paper's levels for each size (Mentzer et al. 2023, table 1): [8,6,5] (240
  codes), [8,5,5,5] (1,000), [7,5,5,5,5] (4,375), [8,8,8,6,5] (15,360);
- LFQ with 8, 10, 12, 14 bits and its entropy loss (defaults).

Per run: validation PSNR on the uint8-rounded reconstructions of every patch of the held-out
photos, codebook usage (% of codes the validation tokens use) and perplexity. The field's
expectation: plain VQ's usage falls as the codebook grows, FSQ and LFQ stay near 100%, and PSNR
rises with size for the methods that use their codes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.photos import load_photos, train_on_photos
from components.config import parse_params

LOG2_SIZES = (8, 10, 12, 14)
FSQ_LEVELS = {8: [8, 6, 5], 10: [8, 5, 5, 5], 12: [7, 5, 5, 5, 5], 14: [8, 8, 8, 6, 5]}
METHODS = {
    "plain": ("plain VQ", lambda b: {"type": "vq", "codebook_size": 2**b, "ema": False, "kmeans_iters": 0,
                                      "restart_after_steps": 0}),
    "vq": ("default VQ", lambda b: {"type": "vq", "codebook_size": 2**b}),
    "fsq": ("FSQ", lambda b: {"type": "fsq", "levels": FSQ_LEVELS[b]}),
    "lfq": ("LFQ", lambda b: {"type": "lfq", "codebook_size": 2**b}),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(LOG2_SIZES), help="log2 codebook sizes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    photos = load_photos()
    print(f"{args.steps} steps, seed {args.seed}, {device}; {len(photos.val)} validation patches\n")
    print("| method | codes | val PSNR (dB) | usage | perplexity | s/run |")
    print("|---|---|---|---|---|---|")
    for key in args.methods.split(","):
        name, quantizer = METHODS[key]
        for bits in args.sizes:
            options = quantizer(bits)
            raw = {"train_tokenizer": {"steps": args.steps, "precision": "fp32", "quantizer": options}}
            cfg = parse_params(raw).train_tokenizer
            result = train_on_photos(cfg, photos, args.seed, device=device)
            codes = str(options["levels"]) if "levels" in options else f"2^{bits}"
            print(
                f"| {name} | {codes} | {result.psnr:.2f} | {result.usage:.1f}% | {result.perplexity:.0f} "
                f"| {result.seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
