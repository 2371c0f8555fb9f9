"""How fast is `vqpipe export` against reading the same token parts? Prints a table (not a
timed test).

    .venv/bin/python benchmarks/lm_export.py [--parts 8] [--rows 25000] [--grid 16] [--codebook 16384] [--repeats 3]

Token parts as `vqpipe tokenize` writes them for a 256-px tokenizer with a 16x16 grid (LlamaGen's
VQ-16): `parts` parts of `rows` rows each, random codes, a built-in shapes caption per row, a
label. Rows:

- plain read: `pq.read_table` of every part, all columns (what the export cannot beat: it
  reads the same bytes);
- export bin / parquet, without and with captions (UTF-8 bytes), into a fresh folder each time.

rows/s and MB/s of token parts read (the parts' file sizes over the seconds); medians over
`repeats`; the ratio to the plain read. Memory: the export holds `batch_rows` rows at a time
(4,096 by default), whatever the parts' size.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import pyarrow.parquet as pq

from components.data import shapes
from components.data import tokens as token_io
from pipelines.lm_export import export_lm


def make_parts(root: Path, parts: int, rows: int, grid: int, codebook: int) -> int:
    """The parts and their manifest; returns their total size in bytes."""
    rng = np.random.default_rng(0)
    captions = [shapes.draw(i).caption for i in range(512)]
    layout = token_io.PartLayout("b" * 64, codebook, (grid, grid))
    entries = []
    for p in range(parts):
        table = token_io.token_table(
            token_io.PartRows(
                keys=[f"{p:05d}-{i:08d}" for i in range(rows)],
                tokens={"tokens": rng.integers(0, codebook, (rows, grid * grid))},
                labels=rng.integers(0, 1000, rows),
                captions=[captions[i % len(captions)] for i in range(rows)],
            ),
            layout,
        )
        name = f"part-{p:05d}.parquet"
        token_io.write_part(table, root / name)
        entries.append({"part": name, "rows": rows, "samples": rows, "rejected": 0, "input_shard": f"{p:05d}.tar"})
    token_io.write_manifest(
        root,
        {
            "tokenizer_fingerprint": "b" * 64,
            "codebook_size": codebook,
            "grid": {"tokens": [grid, grid]},
            "complete": True,
            "parts": entries,
            "rows": parts * rows,
        },
    )
    return sum((root / e["part"]).stat().st_size for e in entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25000)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--codebook", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vqpipe-lm-export-"))
    try:
        tokens = work / "tokens"
        size = make_parts(tokens, args.parts, args.rows, args.grid, args.codebook)
        total = args.parts * args.rows
        print(
            f"{args.parts} parts x {args.rows} rows, {args.grid}x{args.grid} tokens of {args.codebook} codes, "
            f"captions: {size / 1e6:.1f} MB of parts\n"
        )

        def plain() -> None:
            for path in sorted(tokens.glob("part-*.parquet")):
                pq.read_table(path)

        def export(fmt: str, captions: bool):
            def run() -> None:
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                export_lm(tokens, out, fmt, captions=captions)

            return run

        cases = [("plain read (pq.read_table)", plain)]
        for fmt in ("bin", "parquet"):
            for captions in (False, True):
                cases.append((f"export {fmt}{' --captions' if captions else ''}", export(fmt, captions)))
        print("| what | seconds (median) | rows/s | MB/s of parts | x plain read |")
        print("|---|---|---|---|---|")
        base = None
        for name, fn in cases:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            base = base or seconds
            print(
                f"| {name} | {seconds:.2f} | {total / seconds:,.0f} | {size / 1e6 / seconds:.1f} | "
                f"{base / seconds:.2f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
