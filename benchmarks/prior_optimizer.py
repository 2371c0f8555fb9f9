"""What one optimizer step of the prior costs, beside its forward and backward pass: AdamW,
our MuonAdamW orthogonalising in fp32 and in bf16, torch's own torch.optim.Muon (bf16, a matrix
at a time) with an AdamW beside it, and the weight average's update. Medians of --repeats
calls, in ms. Prints a table (not a timed test).

    .venv/bin/python benchmarks/prior_optimizer.py [--layers 4] [--width 128] [--batch 64] [--length 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from components.optim import MuonAdamW, is_hidden_matrix, muon_groups
from components.priors.transformer import PriorConfig, TransformerPrior
from components.weight_ema import WeightEMA
from pipelines.runtime import autocast_dtype


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


class _TorchMuon:
    """torch.optim.Muon on the blocks' matrices and AdamW on the rest: two optimizers."""

    def __init__(self, model: torch.nn.Module):
        hidden = [p for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
        rest = [p for n, p in model.named_parameters() if not is_hidden_matrix(n, p)]
        self.parts = [torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01), torch.optim.AdamW(rest, lr=3e-3)]

    def step(self) -> None:
        for part in self.parts:
            part.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=64, help="tokens per image (the default run: 8x8)")
    parser.add_argument("--codes", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    side = int(args.length**0.5)
    cfg = PriorConfig(
        vocab_size=args.codes,
        seq_len=side * side,
        n_layer=args.layers,
        n_head=4,
        n_embd=args.width,
        num_classes=4,
        layout=((side, side, 1),),
    )
    model = TransformerPrior(cfg)
    tokens = torch.randint(0, args.codes, (args.batch, side * side))
    labels = torch.randint(0, 4, (args.batch,))
    bf16 = autocast_dtype("auto", torch.device("cpu")) is not None  # what training autocasts to here

    def forward_backward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(tokens, labels)
        model.zero_grad(set_to_none=True)
        loss.backward()

    forward_backward()  # every parameter holds a gradient for the steps below
    ema = WeightEMA(model, 0.998)
    rows = [
        (f"forward + backward ({'bf16' if bf16 else 'fp32'} autocast)", forward_backward),
        ("AdamW step", torch.optim.AdamW(model.parameters(), lr=3e-3).step),
        ("MuonAdamW step, orthogonalised in fp32", MuonAdamW(muon_groups(model, 0.02, 3e-3, 0.01)).step),
        (
            "MuonAdamW step, orthogonalised in bf16",
            MuonAdamW(muon_groups(model, 0.02, 3e-3, 0.01), ns_dtype=torch.bfloat16).step,
        ),
        ("torch.optim.Muon (bf16, a matrix at a time) + AdamW step", _TorchMuon(model).step),
        ("weight average update", lambda: ema.update(model)),
    ]
    shape = f"{args.layers} layers x {args.width}, batch {args.batch} x {args.length} tokens"
    print(f"\nprior {shape}, {torch.get_num_threads()} threads")
    print("\n| what | ms (median) |\n|---|---|")
    for name, fn in rows:
        if name.startswith("forward"):
            ms = _median_ms(fn, args.repeats)
        else:
            with torch.no_grad():
                ms = _median_ms(fn, args.repeats)
        print(f"| {name} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
