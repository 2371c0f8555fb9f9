"""Stage `evaluate`: reconstruction, codebook, prior and generation metrics on the validation split.

    dvc repro evaluate          # or: python -m pipelines.evaluate

Writes metrics/evaluate.json: PSNR, SSIM, codebook usage % and perplexity of the validation
tokens, their unigram entropy against the prior's bits per token; for `num_samples` images drawn
from the prior, FID and precision/recall against the validation images (in Inception space
when `inception_weights` is given, else in the tokenizer encoder's, named by
`feature_space`) and, for a labelled dataset, class consistency: the share of samples a small
classifier trained on the validation images assigns to the class they were drawn for. Also
eval/reconstructions.png (originals above their reconstructions) and plots/codebook_usage.csv;
logs all to MLflow.
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
from components.metrics.generation import (
    class_consistency,
    frechet_distance,
    precision_recall,
    tokenizer_features,
    train_classifier,
)
from components.metrics.inception import inception_features, load_inception
from components.priors import Sampler, load_prior, sample_images
from components.tokenizers import Tokenizer
from pipelines.runtime import Paths, resolve_device, stage_main
from pipelines.tracking import stage_run

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

        raw, real_labels, _ = load_split(paths.shards, "val", limit=cfg.max_images)
        images = to_float(raw)
        recon = torch.cat(
            [tokenizer.reconstruct(images[i : i + cfg.batch_size]).cpu() for i in range(0, len(images), cfg.batch_size)]
        )
        metrics = _reconstruction_metrics(cfg, tokenizer, prior, val, (images, recon))
        if cfg.num_samples:
            metrics.update(_generation_metrics(cfg, tokenizer, prior, images, real_labels, device))
        metrics_path = paths.metrics / "evaluate.json"
        write_json(metrics_path, metrics)
        _write_usage_csv(paths.plots / "codebook_usage.csv", val.tokens, tokenizer.codebook_size)
        grid = _reconstruction_grid(images, recon)
        paths.eval.mkdir(parents=True, exist_ok=True)
        grid.save(paths.eval / "reconstructions.png")

        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.set_tag("vqpipe.feature_space", metrics.get("feature_space", "none"))
        mlflow.log_image(grid, key="reconstructions")
        mlflow.log_artifact(str(metrics_path))
        _log_summary(metrics, active.info.run_id)
        return EvaluateResult(metrics, metrics_path, active.info.run_id)


def _reconstruction_metrics(cfg: EvaluateConfig, tokenizer: Tokenizer, prior, val, pair) -> dict:
    """PSNR/SSIM of the reconstructions (`pair`: images, reconstructions), codebook usage and
    perplexity of the validation tokens, and the prior's bits per token against their unigram entropy."""
    images, recon = pair
    stats = codebook_stats({c: val.column(c) for c in val.columns}, tokenizer.column_codebook_sizes)
    labels = torch.from_numpy(val.labels) if prior.num_classes and val.labels is not None else None
    prior_bits = bits_per_token(prior, torch.from_numpy(val.tokens), labels, cfg.batch_size)
    return {
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


def _reconstruction_grid(images: torch.Tensor, recon: torch.Tensor):
    """Rows of GRID_COLUMNS originals, each above its reconstructions."""
    n = min(GRID_COLUMNS * 2, len(images))
    rows = [t for i in range(0, n, GRID_COLUMNS) for t in (images[i : i + GRID_COLUMNS], recon[i : i + GRID_COLUMNS])]
    return make_grid(torch.cat(rows), nrow=GRID_COLUMNS, upscale=2)


def _log_summary(metrics: dict, run_id: str) -> None:
    log.info(
        "PSNR %.2f dB  SSIM %.3f  codebook usage %.1f%%  perplexity %.1f  prior %.3f vs unigram %.3f bits/token",
        *(metrics["psnr"], metrics["ssim"], metrics["codebook_usage"], metrics["perplexity"]),
        *(metrics["prior_bits_per_token"], metrics["unigram_bits_per_token"]),
    )
    if "fid" in metrics:
        judged = "n/a"
        if "class_consistency" in metrics:
            judged = f"{metrics['class_consistency']:.3f} (judge {metrics['classifier_val_accuracy']:.3f})"
        log.info(
            "%d samples: FID %.3f (%s features)  precision %.3f  recall %.3f  class consistency %s",
            *(metrics["generated_images"], metrics["fid"], metrics["feature_space"]),
            *(metrics["precision"], metrics["recall"], judged),
        )
    log.info("evaluation logged to MLflow run %s", run_id)


def _generation_metrics(
    cfg: EvaluateConfig, tokenizer: Tokenizer, prior, real: torch.Tensor, real_labels: torch.Tensor, device
) -> dict:
    """FID, precision/recall and class consistency of `cfg.num_samples` samples against `real`."""
    generator = torch.Generator(device).manual_seed(cfg.seed)
    labels = torch.arange(cfg.num_samples) % prior.num_classes if prior.num_classes else None
    sampler = Sampler(prior, cfg.sampling, generator)
    fake, _, seconds = sample_images(sampler, tokenizer, cfg.num_samples, labels, cfg.batch_size)
    log.info("%d samples drawn in %.1f s", len(fake), seconds)
    if cfg.inception_weights:
        net = load_inception(cfg.inception_weights, device)
        real_f, fake_f = inception_features(net, real), inception_features(net, fake)
        space = "inception"
    else:
        real_f, fake_f = (
            tokenizer_features(tokenizer, real, cfg.batch_size),
            tokenizer_features(tokenizer, fake, cfg.batch_size),
        )
        space = "tokenizer_encoder"
    precision, recall = precision_recall(real_f, fake_f, k=cfg.pr_k)
    out = {
        "feature_space": space,
        "generated_images": len(fake),
        "fid": frechet_distance(real_f, fake_f),
        "precision": precision,
        "recall": recall,
    }
    labelled = real_labels >= 0
    if labels is not None and labelled.sum() > 4:
        classes = max(prior.num_classes, int(real_labels.max()) + 1)
        judge, accuracy = train_classifier(
            real[labelled], real_labels[labelled], classes, steps=cfg.classifier_steps, seed=cfg.seed
        )
        out["class_consistency"] = class_consistency(judge, fake, labels)
        out["classifier_val_accuracy"] = accuracy  # how far the judge itself can be trusted
    return out


def _write_usage_csv(path: Path, tokens, codebook_size: int) -> None:
    """code,count over all token columns: every code up to 65,536 codes, the used ones past
    that (a plot of 2^18 mostly empty rows says less than the list of used codes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codes, counts = used_code_counts(tokens)
    if codebook_size <= 65536:
        dense = np.zeros(codebook_size, dtype=np.int64)
        dense[codes] = counts
        codes, counts = np.arange(codebook_size), dense
    path.write_text(
        "code,count\n" + "".join(f"{c},{n}\n" for c, n in zip(codes.tolist(), counts.tolist(), strict=True))
    )


def main() -> None:
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
