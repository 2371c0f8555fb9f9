"""How each quantizer scales with its codebook: 2^8, 2^10, 2^12 and 2^14 codes, in the default
tokenizer on real photographs (benchmarks/photos.py). Prints a table (not a timed test).

    make bench-deps        # scikit-image, vector-quantize-pytorch
    .venv/bin/python benchmarks/codebook_sweep.py [--steps 600] [--seeds 0 1] [--device cpu|cuda] [--jobs 8]
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
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.photos import load_photos, run_in_processes, train_on_photos
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


def _options(key: str, bits: int) -> dict:
    return METHODS[key][1](bits)


def _train(task: tuple[str, int, int, int, str]):
    """One run: (method, log2 size, seed, steps, device) -> Result."""
    key, bits, seed, steps, device = task
    raw = {"train_tokenizer": {"steps": steps, "precision": "fp32", "quantizer": _options(key, bits)}}
    return train_on_photos(parse_params(raw).train_tokenizer, load_photos(), seed, device=torch.device(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(LOG2_SIZES), help="log2 codebook sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    photos = load_photos()
    print(f"{args.steps} steps, seeds {args.seeds}, {args.device}, {args.jobs} at once; {len(photos.val)} val patches")
    print("means over seeds (per-seed PSNR and usage in brackets)\n")
    print("| method | codes | val PSNR (dB) | usage | perplexity | s/run |")
    print("|---|---|---|---|---|---|")
    keys = args.methods.split(",")
    tasks = [(key, bits, seed, args.steps, args.device) for key in keys for bits in args.sizes for seed in args.seeds]
    results = run_in_processes(_train, tasks, args.jobs)
    for key in keys:
        for bits in args.sizes:
            runs = [next(results) for _ in args.seeds]
            options = _options(key, bits)
            codes = str(options["levels"]) if "levels" in options else f"2^{bits}"
            psnrs = ", ".join(f"{r.psnr:.2f}" for r in runs)
            usages = ", ".join(f"{r.usage:.1f}" for r in runs)
            print(
                f"| {METHODS[key][0]} | {codes} | {statistics.mean(r.psnr for r in runs):.2f} ({psnrs}) "
                f"| {statistics.mean(r.usage for r in runs):.1f}% ({usages}) "
                f"| {statistics.mean(r.perplexity for r in runs):.0f} "
                f"| {statistics.mean(r.seconds for r in runs):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
