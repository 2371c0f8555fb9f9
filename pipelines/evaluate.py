"""Stage `evaluate`: reconstruction, codebook and prior metrics on the validation split.

    dvc repro evaluate          # or: python -m pipelines.evaluate

Writes metrics/evaluate.json (PSNR, SSIM, codebook usage % and perplexity of the validation
tokens, their unigram entropy, the prior's bits per token), eval/reconstructions.png
(originals above their reconstructions) and plots/codebook_usage.csv; logs all to MLflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.config import EvaluateConfig
from components.data import tokens as token_io
from components.data.shards import load_split, to_float
from components.io import write_json
from components.metrics import bits_per_token, codebook_stats, make_grid, psnr, ssim, used_code_counts
from components.priors import load_prior
from components.tokenizers import Tokenizer
from pipelines.common import Paths, resolve_device, stage_main, stage_run

log = logging.getLogger("vqpipe.evaluate")
GRID_COLUMNS = 16


@dataclass
class EvaluateResult:
    metrics: dict
    metrics_path: Path
    run_id: str  # the stage's MLflow run


def run(cfg: EvaluateConfig, paths: Paths = Paths()) -> EvaluateResult:
    device = resolve_device(cfg.device)
    tokenizer = Tokenizer.load(paths.tokenizer, device=device)
    prior, _ = load_prior(paths.prior, device=device, tokenizer=tokenizer)
    val = token_io.read_tokens(token_io.split_parts(paths.tokens, "val"), fingerprint=tokenizer.fingerprint)

    with stage_run("evaluate", cfg) as active:
        import mlflow

        images = to_float(load_split(paths.shards, "val", limit=cfg.max_images)[0])
        recon = torch.cat([tokenizer.reconstruct(images[i : i + cfg.batch_size]).cpu() for i in range(0, len(images), cfg.batch_size)])
        stats = codebook_stats({c: val.column(c) for c in val.columns}, tokenizer.column_codebook_sizes)
        labels = torch.from_numpy(val.labels) if prior.num_classes and val.labels is not None else None
        prior_bits = bits_per_token(prior, torch.from_numpy(val.tokens), labels, cfg.batch_size)
        metrics = {
            "val_images": len(images),
            "psnr": psnr(recon, images).mean().item(),
            "ssim": ssim(recon, images).mean().item(),
            "codebook_usage": stats["codebook_usage"],
            "perplexity": stats["perplexity"],
            "unigram_bits_per_token": stats["unigram_bits_per_token"],
            "prior_bits_per_token": prior_bits,
            # How much the prior knows beyond code frequencies.
            "prior_gain_bits_per_token": stats["unigram_bits_per_token"] - prior_bits,
        }
        metrics_path = paths.metrics / "evaluate.json"
        write_json(metrics_path, metrics)
        _write_usage_csv(paths.plots / "codebook_usage.csv", val.tokens, tokenizer.codebook_size)

        n = min(GRID_COLUMNS * 2, len(images))
        rows = [t for i in range(0, n, GRID_COLUMNS) for t in (images[i : i + GRID_COLUMNS], recon[i : i + GRID_COLUMNS])]
        grid = make_grid(torch.cat(rows), nrow=GRID_COLUMNS, upscale=2)
        paths.eval.mkdir(parents=True, exist_ok=True)
        grid.save(paths.eval / "reconstructions.png")

        mlflow.log_metrics(metrics)
        mlflow.log_image(grid, key="reconstructions")
        mlflow.log_artifact(str(metrics_path))
        log.info(
            "PSNR %.2f dB  SSIM %.3f  codebook usage %.1f%%  perplexity %.1f  prior %.3f vs unigram %.3f bits/token (run %s)",
            metrics["psnr"], metrics["ssim"], metrics["codebook_usage"], metrics["perplexity"],
            prior_bits, stats["unigram_bits_per_token"], active.info.run_id,
        )
        return EvaluateResult(metrics, metrics_path, active.info.run_id)


def _write_usage_csv(path: Path, tokens, codebook_size: int) -> None:
    """code,count over all token columns: every code up to 65,536 codes, the used ones past
    that (a plot of 2^18 mostly empty rows says less than the list of used codes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codes, counts = used_code_counts(tokens)
    if codebook_size <= 65536:
        dense = np.zeros(codebook_size, dtype=np.int64)
        dense[codes] = counts
        codes, counts = np.arange(codebook_size), dense
    path.write_text("code,count\n" + "".join(f"{c},{n}\n" for c, n in zip(codes.tolist(), counts.tolist())))


def main() -> None:
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
