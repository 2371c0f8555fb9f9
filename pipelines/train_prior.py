"""Stage `train_prior`: a causal transformer over the token shards (raster order), or with
`kind: maskgit` a bidirectional one trained on masked tokens (components/priors/maskgit.py).

    dvc repro train_prior          # or: python -m pipelines.train_prior

Class-conditional through a prepended class token when the tokens carry labels, with label
dropout so the same model samples unconditionally and with classifier-free guidance; with
`condition: text`, conditioned on each image's caption read before it (UTF-8 bytes, caption
dropout in place of label dropout; rows with `text.held_out_captions` never trained on).
Checkpoints every `checkpoint_every` steps in `checkpoint_dir` and resumes a killed run
exactly; `ddp_workers: N` trains on N Ray Train workers (DDP), like train_tokenizer. For a
VQ-VAE-2 tokenizer, a top prior and a bottom prior conditioned on the top tokens (one joint
loss, the mean over all tokens). Reads the Parquet parts with pyarrow (columnar, no per-row
Python) and refuses parts made by another tokenizer. Writes models/prior/{config.json,
model.safetensors}, metrics/train_prior.json and plots/train_prior.csv; logs train/val bits per
token to MLflow.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.config import TrainPriorConfig
from components.io import replace_dir, write_json
from components.tokenizers import Tokenizer
from pipelines.distributed import train
from pipelines.recipes.prior import PriorJob, train_worker
from pipelines.registry import PRIOR_CONDITION_TAG, PRIOR_KIND_TAG, prior_condition, register
from pipelines.runtime import Paths, stage_main
from pipelines.tracking import absolute_tracking_uri, stage_run, tokens_input

log = logging.getLogger("vqpipe.train_prior")


@dataclass
class TrainPriorResult:
    out_dir: Path
    metrics: dict
    run_id: str  # the stage's MLflow run


def run(cfg: TrainPriorConfig, paths: Paths = Paths()) -> TrainPriorResult:
    tokenizer = Tokenizer.load(paths.tokenizer)
    with stage_run("train_prior", cfg, [tokens_input(paths.tokens)]) as active:
        import mlflow

        with tempfile.TemporaryDirectory(prefix="vqpipe-prior-") as staging:
            job = PriorJob(
                root=str(paths.root.resolve()),
                checkpoint_dir=str(paths.within(cfg.checkpoint_dir)),
                run_id=active.info.run_id,
                tracking_uri=absolute_tracking_uri(mlflow.get_tracking_uri()),
                staging=staging,
            )
            train(train_worker, cfg, job, "train_prior")
            summary = json.loads((Path(staging) / "summary.json").read_text())
            # Replaced as a unit: the old export stays whole until the new one is.
            replace_dir(paths.prior, lambda d: shutil.copytree(Path(staging) / "prior", d, dirs_exist_ok=True))
            paths.plots.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(staging) / "train_prior.csv", paths.plots / "train_prior.csv")
        write_json(paths.metrics / "train_prior.json", summary)
        mlflow.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifacts(str(paths.prior), artifact_path="prior")
        # The tokenizer travels with the prior in MLflow: `models:/vqpipe-prior@alias` samples alone.
        mlflow.log_artifacts(str(paths.tokenizer), artifact_path="prior/tokenizer")
        if cfg.registered_model:
            version = register(
                "prior",
                cfg.registered_model,
                paths.prior,
                tokenizer.fingerprint,
                "vqpipe priors (with their tokenizer)",
                bundled={"tokenizer": paths.tokenizer},
                tags={PRIOR_KIND_TAG: cfg.kind, PRIOR_CONDITION_TAG: prior_condition(paths.prior)},
            )
            log.info("MLflow model %s version %s", cfg.registered_model, version)
        log.info("prior written to %s", paths.prior)
        return TrainPriorResult(paths.prior, summary, active.info.run_id)


def main() -> None:
    stage_main("train_prior", run)


if __name__ == "__main__":
    main()
