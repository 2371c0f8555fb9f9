"""Stage `sample`: images drawn from the prior (KV-cached) and decoded by the tokenizer.

    dvc repro sample          # or: python -m pipelines.sample

Writes samples/grid.png: one row per class for a conditional prior, `sample.num_images` for an
unconditional one. Logged to MLflow as an image.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.config import SampleConfig
from components.metrics import save_grid
from components.priors import load_prior, sample
from components.tokenizers import Tokenizer
from pipelines.common import Paths, resolve_device, seed_everything, stage_main, stage_run

log = logging.getLogger("vqpipe.sample")


@dataclass
class SampleResult:
    grid_path: Path
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    labels: torch.Tensor | None
    tokens_per_second: float


def run(cfg: SampleConfig, paths: Paths = Paths()) -> SampleResult:
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer = Tokenizer.load(paths.tokenizer, device=device)
    prior, meta = load_prior(paths.prior, device=device, tokenizer=tokenizer)

    with stage_run("sample", cfg) as active:
        import mlflow

        num_classes = prior.num_classes
        if num_classes:
            labels = torch.arange(num_classes).repeat_interleave(cfg.num_per_class)
            per_row = cfg.num_per_class
        else:
            labels = None
            per_row = math.ceil(math.sqrt(cfg.num_images))
        n = len(labels) if labels is not None else cfg.num_images

        limits = tokenizer.vocab_limits()
        started = time.perf_counter()
        tokens = []
        for start in range(0, n, cfg.batch_size):
            batch_labels = labels[start : start + cfg.batch_size] if labels is not None else None
            count = len(batch_labels) if batch_labels is not None else min(cfg.batch_size, n - start)
            tokens.append(
                sample(
                    prior, count, batch_labels, cfg.temperature, cfg.top_k, generator=generator,
                    vocab_limits=limits, top_p=cfg.top_p, cfg_scale=cfg.cfg_scale,
                )
            )
        tokens = torch.cat(tokens)
        elapsed = time.perf_counter() - started
        images = tokenizer.decode(tokenizer.unflatten(tokens)).cpu()

        grid_path = paths.samples / "grid.png"
        grid = save_grid(images, grid_path, nrow=per_row, upscale=2)
        tokens_per_second = tokens.numel() / elapsed
        mlflow.log_image(grid, key="samples")
        mlflow.log_artifact(str(grid_path))
        mlflow.log_metrics({"images": n, "tokens_per_second": tokens_per_second})
        rows = f"one row per class: {', '.join(meta['class_names'])}" if num_classes and meta.get("class_names") else ""
        log.info("%d samples (%.0f tokens/s) in %s %s (run %s)", n, tokens_per_second, grid_path, rows, active.info.run_id)
        return SampleResult(grid_path, images, labels, tokens_per_second)


def main() -> None:
    stage_main("sample", run)


if __name__ == "__main__":
    main()
