"""How much does the KV cache buy? Prints a table (not a timed test).

    .venv/bin/python benchmarks/sampling.py [--layers 12 --width 512 --length 256 --batch 16] [--full]

Tokens per second drawing `batch` sequences of `length` tokens from a randomly initialised
prior of `layers` x `width` (learned 2D positions over a square grid; random weights cost the
same as trained ones), with the KV cache (each step feeds one token) and without (each step
recomputes the whole prefix). Goal: cached >= 5x uncached.

Uncached generation of 256 tokens with a 12x512 model takes many minutes on a laptop CPU, so by
default its time is integrated from the forward pass measured at 9 evenly spaced prefix lengths
(the step at prefix i costs one forward over i+1 tokens; the trapezoid rule sums them);
`--full` times the whole uncached generation instead (use it on a GPU).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import timed
from components.priors import PriorConfig, Sampler, TransformerPrior
from pipelines.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full", action="store_true", help="time the whole uncached generation")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model = _prior(args, device)
    labels = torch.arange(args.batch) % 10
    params = sum(p.numel() for p in model.parameters()) / 1e6
    tokens = args.batch * args.length

    def draw(use_cache: bool) -> None:
        Sampler(model, generator=torch.Generator(device).manual_seed(0), use_cache=use_cache).draw(args.batch, labels)

    draw(use_cache=True)  # warm-up
    cached = statistics.median(timed(lambda: draw(use_cache=True), device) for _ in range(args.repeats))
    if args.full:
        uncached = timed(lambda: draw(use_cache=False), device)
        how = "measured"
    else:
        uncached, points = _uncached_estimate(model, args, device)
        how = f"integrated from {points} prefix lengths"

    print(
        f"prior {args.layers}x{args.width} ({params:.1f}M parameters), {args.length} tokens, "
        f"batch {args.batch}, {device}\n"
    )
    print(f"{'sampling':<10} {'seconds':>9} {'tokens/s':>10}")
    print(f"{'cached':<10} {cached:>9.2f} {tokens / cached:>10.0f}")
    print(f"{'uncached':<10} {uncached:>9.2f} {tokens / uncached:>10.0f}   ({how})")
    print(f"\ncached / uncached: {uncached / cached:.1f}x (goal >= 5x)")


def _prior(args, device: torch.device) -> TransformerPrior:
    side = math.isqrt(args.length)
    layout = ((side, args.length // side, 1),) if side * (args.length // side) == args.length else ()
    torch.manual_seed(0)
    cfg = PriorConfig(
        vocab_size=args.vocab,
        seq_len=args.length,
        num_classes=10,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.width,
        layout=layout,
    )
    return TransformerPrior(cfg).to(device).eval()


@torch.no_grad()
def _uncached_estimate(model: TransformerPrior, args, device: torch.device) -> tuple[float, int]:
    """Seconds of an uncached generation: the sum over steps i = 1..length of one forward over
    i tokens, integrated (trapezoid) from the forward timed at 9 prefix lengths."""
    points = sorted({max(1, round(x)) for x in torch.linspace(1, args.length, 9).tolist()})
    cost = {}
    for p in points:
        idx = torch.randint(0, args.vocab, (args.batch, p), device=device)
        model.forward_tokens(idx)  # warm-up at this length
        cost[p] = statistics.median(timed(lambda idx=idx: model.forward_tokens(idx), device) for _ in range(2))
    uncached = cost[points[0]]
    for a, b in itertools.pairwise(points):
        uncached += (cost[a] + cost[b]) / 2 * (b - a)
    return uncached, len(points)


if __name__ == "__main__":
    main()
