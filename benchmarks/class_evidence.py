"""How much does the trained prior know about the class, and do its samples show it? Reads a
finished run's outputs (`make run` first). Prints tables (not a timed test).

    .venv/bin/python benchmarks/class_evidence.py [--samples 256] [--scales 1 2 3 5] [--temperatures 1.0 0.8]
        [--project DIR]

1. Bits per token of the validation tokens under the prior, given the true class and given the
   null (unconditional) token, against the most the class can be worth: log2(classes) bits an
   image, spread over its tokens (the mutual information of class and tokens is at most the
   class's entropy).
2. The judge `evaluate` uses (trained on the labelled validation images outside its held-out
   fifth) on held-out real images and on their reconstructions through the tokenizer: what a
   perfect prior's samples would score.
3. Class consistency of samples (classes round-robin, the judge above) under each sampling
   setting: guidance scale x temperature.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from components.config import SamplingOptions, parse_params, read_yaml
from components.data import tokens as token_io
from components.data.shards import split_batches, to_float
from components.metrics.prior import PriorBits
from components.priors import Sampler, image_batches, load_prior
from components.tokenizers import Tokenizer
from pipelines.evaluate import _HeldOut, _train_judge
from pipelines.runtime import Paths


def _prior_bits(prior, val_parts: list[Path]) -> tuple[float, float, int]:
    """Bits per token of the validation tokens given their class and given the null token."""
    data = token_io.read_tokens(val_parts)
    tokens = torch.from_numpy(np.asarray(data.tokens, dtype=np.int64))
    labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    given, unconditional = PriorBits(prior), PriorBits(prior)
    for i in range(0, len(tokens), 256):
        given.add(tokens[i : i + 256], labels[i : i + 256])
        unconditional.add(tokens[i : i + 256], torch.full_like(labels[i : i + 256], -1))
    return given.bits, unconditional.bits, tokens.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.8])
    parser.add_argument("--project", default=".", help="a project folder (prior_kinds.py --keep makes some)")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    paths = Paths(args.project)
    cfg = parse_params(read_yaml(ROOT / "params.yaml")).evaluate
    tokenizer = Tokenizer.load(paths.tokenizer)
    prior, _ = load_prior(paths.prior, tokenizer=tokenizer)
    classes = prior.num_classes

    with torch.no_grad():
        given, unconditional, length = _prior_bits(prior, token_io.split_parts(paths.tokens, "val"))
    ceiling = math.log2(classes) / length
    print(f"\n## What the prior knows of the class ({classes} classes, {length} tokens an image)\n")
    print("| validation tokens | bits/token |")
    print("|---|---|")
    print(f"| given the true class | {given:.4f} |")
    print(f"| given the null token | {unconditional:.4f} |")
    share = (unconditional - given) / ceiling
    # Not bounded by the ceiling: the null-token mode is trained on label_dropout of the batches,
    # and how much worse it is adds to the difference.
    print(f"| difference | {unconditional - given:.4f} ({share:.0%} of the ceiling; a weak null mode adds to it) |")
    print(f"| ceiling: log2({classes}) / {length} | {ceiling:.4f} |")

    judge, accuracy = _train_judge(cfg, paths.shards, classes)
    torch.set_grad_enabled(False)
    held_out = _HeldOut(cfg.seed)
    hits = total = 0
    for raw, labels, keys in split_batches(paths.shards, "val", cfg.batch_size):
        mask = torch.tensor([held_out(k) for k in keys])
        recon = tokenizer.reconstruct(to_float(raw[mask]))
        hits += int((judge(recon).argmax(1) == labels[mask]).sum())
        total += int(mask.sum())
    print("\n## The judge\n")
    print(f"held-out real images: {accuracy:.3f}; their reconstructions: {hits / total:.3f} ({total} images)")

    print(f"\n## Class consistency of {args.samples} samples\n")
    print("| guidance scale | temperature | class consistency | seconds |")
    print("|---|---|---|---|")
    labels = torch.arange(args.samples) % classes
    for scale in args.scales:
        for temperature in args.temperatures:
            options = SamplingOptions(guidance_scale=scale, temperature=temperature)
            sampler = Sampler(prior, options, torch.Generator().manual_seed(cfg.seed))
            hits = 0
            start = time.perf_counter()
            for images, batch_labels, _ in image_batches(sampler, tokenizer, args.samples, labels, cfg.batch_size):
                hits += int((judge(images).argmax(1) == batch_labels).sum())
            print(
                f"| {scale:g} | {temperature:g} | {hits / args.samples:.3f} | {time.perf_counter() - start:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
