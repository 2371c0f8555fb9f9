"""Is the data loader the bottleneck of tokenizer training? Prints a table (not a timed test).

    .venv/bin/python benchmarks/train_tokenizer.py [--steps 150] [--images 8000]

Steps per second of the default tokenizer's training step fed by the stage's real WebDataset
loader (shards on disk, decoded in `loader_workers` DataLoader processes), against the same model
and step fed from an in-memory tensor of the same images. Goal: loader >= 0.9 of in-memory.

Then the whole stage (`train_tokenizer.run`) with `workers: 1` (in process) and `workers: 2`
(two Ray Train workers, DDP over gloo, or NCCL on GPUs), the same global batch: steps/s and
images/s from its summary, which counts from the first batch (k-means init and one validation
included).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import shapes_project, sibling
from components.config import parse_params
from components.data.shards import load_split
from components.data.stream import StreamLayout, assembled
from components.tokenizers.training import build_step, compile_convolutions
from pipelines import train_tokenizer
from pipelines.distributed import init_ray
from pipelines.recipes.tokenizer import build_loader
from pipelines.runtime import resolve_device


def _steps_per_second(batches, cfg, steps: int, warmup: int) -> float:
    """Median over 3 windows of steps/s, after `warmup` steps (k-means init, loader start-up)."""
    torch.manual_seed(0)
    trainer = build_step(cfg, 32, resolve_device(cfg.device))
    if cfg.compile:
        compile_convolutions(trainer)  # compiled during the warm-up steps
    batches = iter(batches)
    for step, images in enumerate(itertools.islice(batches, warmup), start=1):
        trainer.step(images, step)
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        for images in itertools.islice(batches, steps // 3):
            trainer.step(images, warmup + 1)
        rates.append((steps // 3) / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--images", type=int, default=8000)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    paths = shapes_project(args.images, "vqpipe-bench-loader-")
    cfg = parse_params({}).train_tokenizer
    _loader_table(paths, cfg, args)
    _stage_table(paths, cfg, args)


def _loader_table(paths, cfg, args) -> None:
    """The step fed from memory against the step fed by the shard loader."""
    images = load_split(paths.shards, "train")[0]
    generator = torch.Generator().manual_seed(0)

    def in_memory():
        while True:
            yield images[torch.randint(0, len(images), (cfg.batch_size,), generator=generator)]

    print(
        f"\n## Tokenizer training: default model, batch {cfg.batch_size}, "
        f"{images.shape[-1]}x{images.shape[-1]} images, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores\n"
    )
    print("| fed by | steps/s | vs in-memory |")
    print("|---|---|---|")
    reference = _steps_per_second(in_memory(), cfg, args.steps, args.warmup)
    print(f"| in-memory tensor | {reference:.2f} | 1.00 |", flush=True)
    compiled = _steps_per_second(in_memory(), cfg.model_copy(update={"compile": True}), args.steps, args.warmup)
    print(f"| in-memory tensor, compile: true | {compiled:.2f} | {compiled / reference:.2f} |", flush=True)
    for workers in (0, 1, 2):
        loader_cfg = cfg.model_copy(update={"loader_workers": workers})
        layout = StreamLayout(loader_cfg.batch_size, loader_cfg.lanes, loader_workers=workers)
        pieces = build_loader(loader_cfg, paths.shards, layout)
        loader = (batch for batch, _labels in assembled(iter(pieces), pieces.dataset.pieces_per_batch))
        rate = _steps_per_second(loader, loader_cfg, args.steps, args.warmup)
        print(f"| shard loader, loader_workers={workers} | {rate:.2f} | {rate / reference:.2f} |", flush=True)


def _stage_table(paths, cfg, args) -> None:
    """The whole stage in its own process against two DDP workers on Ray Train."""
    init_ray()
    print(f"\n## The train_tokenizer stage, {args.steps} steps, global batch {cfg.batch_size}\n")
    print("| DDP workers | steps/s | images/s | replicas identical |")
    print("|---|---|---|---|")
    for workers in (1, 2):
        run_paths = sibling(paths, f"workers{workers}")
        stage_cfg = cfg.model_copy(
            update={
                "ddp_workers": workers,
                "steps": args.steps,
                "val_every": args.steps,
                "checkpoint_every": args.steps,
                "checkpoint_dir": str(run_paths.root / "checkpoints"),
            }
        )
        summary = train_tokenizer.run(stage_cfg, run_paths).metrics
        print(
            f"| {workers}{' (Ray Train)' if workers > 1 else ' (in process)'} | {summary['steps_per_second']:.2f} | "
            f"{summary['images_per_second']:.0f} | {summary['replicas_identical']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
