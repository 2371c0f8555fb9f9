"""Quantizer speed, memory and quality, printed as tables (not a timed test).

    .venv/bin/python benchmarks/quantizers.py                 # all three tables (~15 min on 2 cores)
    .venv/bin/python benchmarks/quantizers.py --only lookup   # lookup | step | quality

1. Nearest-code lookup, N=65,536 vectors, d=64, K=16,384, fp32 on CPU: our chunked search against
   `torch.cdist(z, codebook).argmin(1)`, median time and peak extra memory (growth of the peak resident set
   over the inputs and warm-up, each measured in a fresh process so one method's peak cannot hide another's).
2. One training forward+backward of each quantizer type at K=16,384 (and LFQ at 2^18 with its
   entropy loss) on 8,192 vectors of width 64.
3. Quality: the default tokenizer trained briefly with each type on the built-in shapes data;
   validation PSNR, codebook usage and perplexity side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import logging

import torch

from benchmarks.common import shapes_project, sibling
from components.config import parse_params
from components.data.shards import load_split, to_float
from components.metrics import codebook_stats, psnr
from components.quantizers import QUANTIZERS, nearest_codes
from components.quantizers.vq import SEARCH_BUDGET_BYTES
from components.tokenizers import Tokenizer
from pipelines import train_tokenizer

LOOKUP = {"n": 65536, "d": 64, "k": 16384}
STEP_VECTORS = (32, 16, 16, 64)  # 8,192 vectors of width 64
STEP_CONFIGS = {
    "vq (EMA)": {"type": "vq", "codebook_size": 16384},
    "vq (gradient)": {"type": "vq", "codebook_size": 16384, "ema": False},
    "vq (cosine, dim 8)": {"type": "vq", "codebook_size": 16384, "cosine": True, "codebook_dim": 8},
    "gumbel": {"type": "gumbel", "codebook_size": 16384},
    "product (2 groups)": {"type": "product", "codebook_size": 16384, "groups": 2},
    "residual (4 stages)": {"type": "residual", "codebook_size": 16384, "stages": 4},
    "fsq [8,8,8,8,4]": {"type": "fsq", "levels": [8, 8, 8, 8, 4]},
    "lfq 2^14": {"type": "lfq", "codebook_size": 2**14},
    "lfq 2^18": {"type": "lfq", "codebook_size": 2**18},
}
# Comparable budgets: 7 bits per token (128 codes) for every type; product and residual carry
# two such tokens per position.
QUALITY_CONFIGS = {
    "vq (EMA)": {"type": "vq", "codebook_size": 128},
    "vq (gradient)": {"type": "vq", "codebook_size": 128, "ema": False},
    "vq (cosine, dim 8)": {"type": "vq", "codebook_size": 128, "cosine": True, "codebook_dim": 8},
    "gumbel": {"type": "gumbel", "codebook_size": 128},
    "product (2x128)": {"type": "product", "codebook_size": 128, "groups": 2},
    "residual (2x128)": {"type": "residual", "codebook_size": 128, "stages": 2},
    "fsq [8,4,4]": {"type": "fsq", "levels": [8, 4, 4]},
    "lfq 2^7": {"type": "lfq", "codebook_size": 128},
}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Restart the peak resident set (VmHWM) at the current one; returns the current one."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _child(job: dict) -> dict:
    """Run one measurement in this (fresh) process; returns times and peak extra memory."""

    torch.manual_seed(0)
    if job["kind"] == "lookup":
        z = torch.randn(LOOKUP["n"], LOOKUP["d"])
        codebook = torch.randn(LOOKUP["k"], LOOKUP["d"])
        if job["method"] == "cdist":
            run = lambda: torch.cdist(z, codebook).argmin(dim=1)  # noqa: E731
        else:
            run = lambda: nearest_codes(z, codebook, job["chunk"])  # noqa: E731
        result = None
    else:
        raw = job["config"]
        quantizer = QUANTIZERS[raw["type"]].model_validate(raw).build(STEP_VECTORS[-1]).train()
        z = torch.randn(*STEP_VECTORS, requires_grad=True)
        quantizer(z.detach())  # data-dependent initialisation (k-means) outside the timing

        def run():
            out = quantizer(z)
            (out.quantized.square().mean() + out.loss).backward()
            z.grad = None
            return out.indices

    baseline = _reset_peak()
    times = []
    for _ in range(job["repeats"]):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    if job.get("out"):
        torch.save(result, job["out"])
    return {"times": times, "peak_extra": _status_bytes("VmHWM") - baseline}


def _measure(job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def lookup_table(repeats: int) -> None:
    print(
        f"\n## Nearest-code lookup: N={LOOKUP['n']:,}, d={LOOKUP['d']}, K={LOOKUP['k']:,}, fp32, "
        f"CPU ({os.cpu_count()} cores)\n"
    )
    print("| method | median time | peak extra memory | time vs cdist |")
    print("|---|---|---|---|")

    scratch = Path(tempfile.mkdtemp(prefix="vqpipe-lookup-"))
    reference = _measure({"kind": "lookup", "method": "cdist", "repeats": repeats, "out": str(scratch / "cdist.pt")})
    rows = [("torch.cdist(...).argmin", reference)]
    for chunk in (1024, 2048, 4096, 8192):
        out = scratch / f"ours-{chunk}.pt"
        effective = min(chunk, SEARCH_BUDGET_BYTES // (4 * LOOKUP["k"]))
        label = f"nearest_codes, chunk {chunk}" + (f" (budget caps it at {effective})" if effective < chunk else "")
        rows.append(
            (label, _measure({"kind": "lookup", "method": "ours", "chunk": chunk, "repeats": repeats, "out": str(out)}))
        )
        _check_against_cdist(
            torch.load(out, weights_only=True), torch.load(scratch / "cdist.pt", weights_only=True), chunk
        )
    ref_time = statistics.median(reference["times"])
    for name, r in rows:
        t = statistics.median(r["times"])
        print(f"| {name} | {t:.3f} s | {_mib(r['peak_extra'])} | {t / ref_time:.2f} |")


def _check_against_cdist(ours, theirs, chunk: int) -> None:
    """fp32 rounding may break near-ties differently: where the two disagree, the float64
    distances of both picks must be equal to within fp32 precision."""

    torch.manual_seed(0)
    z = torch.randn(LOOKUP["n"], LOOKUP["d"]).double()
    codebook = torch.randn(LOOKUP["k"], LOOKUP["d"]).double()
    differ = (ours != theirs).nonzero().squeeze(1)
    if differ.numel():
        d_ours = (z[differ] - codebook[ours[differ]]).square().sum(1)
        d_theirs = (z[differ] - codebook[theirs[differ]]).square().sum(1)
        worst = ((d_ours - d_theirs) / d_theirs).max().item()
        if worst > 1e-5:
            raise AssertionError(f"chunk {chunk}: a pick {worst:.2e} farther than cdist's")
    print(
        f"<!-- chunk {chunk}: {differ.numel()} of {len(ours)} picks differ from cdist's, all float ties -->",
        file=sys.stderr,
    )


def step_table(repeats: int) -> None:
    n = 1
    for s in STEP_VECTORS[:-1]:
        n *= s
    print(f"\n## Training forward+backward, {n:,} vectors of width {STEP_VECTORS[-1]}, fp32, CPU\n")
    print("| quantizer | codes | median step | peak extra memory |")
    print("|---|---|---|---|")

    for name, raw in STEP_CONFIGS.items():
        codes = QUANTIZERS[raw["type"]].model_validate(raw).codebook_size
        r = _measure({"kind": "step", "config": raw, "repeats": repeats})
        print(f"| {name} | {codes:,} | {statistics.median(r['times']) * 1000:.0f} ms | {_mib(r['peak_extra'])} |")


def quality_table(steps: int, images: int) -> None:
    base = shapes_project(images, "vqpipe-bench-")
    val = to_float(load_split(base.shards, "val")[0])
    print(
        f"\n## Quality: default tokenizer, {steps} steps, built-in shapes "
        f"({images:,} images, {len(val):,} validation)\n"
    )
    print("| quantizer | tokens/position | bits/position | val PSNR | codebook usage | perplexity | steps/s |")
    print("|---|---|---|---|---|---|---|")
    for name, raw in QUALITY_CONFIGS.items():
        params = parse_params({"train_tokenizer": {"quantizer": raw, "steps": steps, "val_every": steps}})
        paths = sibling(base, name.replace(" ", "_").replace("/", "_").replace(",", ""))
        result = train_tokenizer.run(params.train_tokenizer, paths)
        tok = Tokenizer.load(paths.tokenizer)
        with torch.no_grad():
            indices = torch.cat([tok.encode(val[i : i + 256]) for i in range(0, len(val), 256)])
            recon = torch.cat([tok.decode(indices[i : i + 256]) for i in range(0, len(val), 256)])
            columns = [tok.encode_columns(val[i : i + 256]) for i in range(0, len(val), 256)]
        columns = {c: torch.cat([part[c] for part in columns]).numpy() for c in tok.token_columns}
        stats = codebook_stats(columns, tok.column_codebook_sizes)
        bits = tok.tokens_per_position * torch.log2(torch.tensor(float(tok.codebook_size))).item()
        print(
            f"| {name} | {tok.tokens_per_position} | {bits:.0f} | {psnr(recon, val).mean().item():.2f} dB | "
            f"{stats['codebook_usage']:.1f}% | {stats['perplexity']:.1f} | {result.metrics['steps_per_second']:.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["lookup", "step", "quality"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quality-steps", type=int, default=600)
    parser.add_argument("--quality-images", type=int, default=8000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    logging.disable(logging.INFO)
    if args.only in (None, "lookup"):
        lookup_table(args.repeats)
    if args.only in (None, "step"):
        step_table(args.repeats)
    if args.only in (None, "quality"):
        quality_table(args.quality_steps, args.quality_images)


if __name__ == "__main__":
    main()
