"""Stage `train_tokenizer`: a VQ-VAE, VQ-VAE-2 or VQ-GAN trained on the shards (streamed),
in this process or on N Ray Train workers (DDP); resumable. The training itself is the recipe in
`pipelines/recipes/tokenizer.py`; this module is the stage around it.

    dvc repro train_tokenizer          # or: python -m pipelines.train_tokenizer

Writes models/tokenizer/{config.json,model.safetensors} (load with
`components.tokenizers.Tokenizer.load`), metrics/train_tokenizer.json and
plots/train_tokenizer.csv. One MLflow run per stage run (only rank 0 logs): all params, losses,
codebook usage and perplexity and learning rates per step, PSNR/SSIM and a reconstruction grid
per validation, system metrics, and the exported tokenizer.

Checkpoints: a full training state in `checkpoint_dir` every `checkpoint_every` steps and at
the end (components/checkpoint.py). Rerunning after a kill resumes from it; a checkpoint of an
unfinished run with other training settings is refused, naming them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.config import TrainTokenizerConfig
from components.data.shards import read_manifest
from components.io import write_json
from components.tokenizers import Tokenizer
from pipelines.distributed import train
from pipelines.recipes.tokenizer import Job, train_worker
from pipelines.registry import register
from pipelines.runtime import Paths, resolve_device, stage_main
from pipelines.tracking import absolute_tracking_uri, shards_input, stage_run

log = logging.getLogger("vqpipe.train_tokenizer")


@dataclass
class TrainTokenizerResult:
    out_dir: Path
    fingerprint: str
    metrics: dict
    run_id: str  # the stage's MLflow run


def run(cfg: TrainTokenizerConfig, paths: Paths = Paths()) -> TrainTokenizerResult:
    manifest = read_manifest(paths.shards)
    image_size = manifest["image_size"]
    if image_size % cfg.downsample:
        raise ValueError(
            f"train_tokenizer.downsample={cfg.downsample} does not divide the shards' image size {image_size}"
        )
    if cfg.ddp_workers == 1:
        resolve_device(cfg.device)  # fail before the run starts, not in it
    train_sums = sorted(s["sha256"] for s in manifest["shards"] if s["split"] == "train")

    inputs = [shards_input(paths.shards)]
    with (
        stage_run("train_tokenizer", cfg, inputs) as active,
        tempfile.TemporaryDirectory(prefix="vqpipe-train-") as staging,
    ):
        import mlflow

        job = Job(
            shards=str(paths.shards.resolve()),
            checkpoint_dir=str(paths.within(cfg.checkpoint_dir)),
            staging=staging,
            image_size=image_size,
            data_fingerprint=hashlib.sha256("".join(train_sums).encode()).hexdigest(),
            run_id=active.info.run_id,
            tracking_uri=absolute_tracking_uri(mlflow.get_tracking_uri()),
            perceptual_weights=str(Path(cfg.perceptual_weights).resolve()) if cfg.perceptual_weights else None,
        )
        train(train_worker, cfg, job, "train_tokenizer")

        summary = json.loads((Path(staging) / "summary.json").read_text())
        tokenizer = Tokenizer.load(Path(staging) / "tokenizer")
        tokenizer.save(paths.tokenizer)
        write_json(paths.metrics / "train_tokenizer.json", summary)
        paths.plots.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(staging) / "train_tokenizer.csv", paths.plots / "train_tokenizer.csv")
        mlflow.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifacts(str(paths.tokenizer), artifact_path="tokenizer")
        mlflow.set_tag("vqpipe.tokenizer_fingerprint", tokenizer.fingerprint)
        if cfg.registered_model:
            version = register(
                "tokenizer", cfg.registered_model, paths.tokenizer, tokenizer.fingerprint, "vqpipe image tokenizers"
            )
            log.info("MLflow model %s version %s", cfg.registered_model, version)
        log.info("tokenizer %s written to %s", tokenizer.fingerprint[:12], paths.tokenizer)
        return TrainTokenizerResult(paths.tokenizer, tokenizer.fingerprint, summary, active.info.run_id)


def main() -> None:
    stage_main("train_tokenizer", run)


if __name__ == "__main__":
    main()
