"""The pipeline flow: one Prefect task per DVC stage, in DAG order.

Each task has DVC reproduce exactly its stage (`dvc repro --single-item`), so a fresh stage is
skipped by DVC, never by Prefect. One MLflow parent run per flow run, tagged with the Prefect
flow-run id; every stage that runs logs a nested run under it.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from components.config import load_params
from flows.dvc import FINGERPRINT_STAGE, STAGES, repro_stage, stage_status
from pipelines.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, PARENT_RUN_ENV, absolute_tracking_uri

RESUMABLE_STAGES = ("train_tokenizer", "train_prior")


def tracking_uri(repo: Path) -> str:
    """MLFLOW_TRACKING_URI, or the project's sqlite store made absolute so every stage shares it."""
    return absolute_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI), repo)


@task(task_run_name="{stage}")
def reproduce(stage: str, repo: str, env: dict[str, str], force: bool = False) -> dict:
    """Reproduce one stage through DVC; returns {"stage", "ran", "reasons"}."""
    logger = get_run_logger()
    reasons = stage_status(repo, stage).get(stage, [])
    logger.info("%s: %s", stage, "; ".join(reasons) if reasons else "up to date per DVC")
    ran = repro_stage(repo, stage, env, on_line=lambda line: logger.info("[%s] %s", stage, line), force=force)
    logger.info("%s: %s", stage, "ran" if ran else "skipped by DVC (unchanged)")
    return {"stage": stage, "ran": ran, "reasons": reasons}


@flow(name="vqpipe-pipeline", log_prints=True)
def pipeline(repo: str = ".", stages: list[str] | None = None, force: bool = False) -> dict:
    """Run the pipeline's stages (all by default) in DAG order through DVC.

    Returns {"mlflow_run_id", "flow_run_id", "stages": [{"stage", "ran", "reasons"}, ...]}."""
    root = Path(repo).resolve()
    load_params(root / "params.yaml")  # invalid params fail here, before any stage runs
    unknown = set(stages or []) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)} (allowed: {', '.join(STAGES)})")
    # The source listing goes with `shard`: without a current one, DVC cannot tell whether it is stale.
    wanted = set(stages or STAGES) | ({FINGERPRINT_STAGE} if "shard" in (stages or STAGES) else set())
    chosen = [s for s in STAGES if s in wanted]

    uri = tracking_uri(root)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    flow_run_id = str(flow_run.id) if flow_run.id else ""
    tags = {
        "prefect.flow_run_id": flow_run_id,
        "prefect.flow_run_name": str(flow_run.name or ""),
        "vqpipe.stage": "pipeline",
    }
    with mlflow.start_run(run_name=f"pipeline-{flow_run.name or 'local'}", tags=tags) as parent:
        env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment, PARENT_RUN_ENV: parent.info.run_id}
        results = []
        for stage in chosen:
            # A stage that resumes from its checkpoint gets retried: a lost worker or a killed
            # process costs the steps since the last checkpoint, not the run.
            task_ = (
                reproduce.with_options(retries=1, retry_delay_seconds=10) if stage in RESUMABLE_STAGES else reproduce
            )
            results.append(task_(stage, str(root), env, force))
        mlflow.set_tag("vqpipe.stages_ran", ",".join(r["stage"] for r in results if r["ran"]) or "none")
    return {"mlflow_run_id": parent.info.run_id, "flow_run_id": flow_run_id, "stages": results}


def scheduled_deployment(repo: str, cron: str, name: str = "vqpipe-scheduled"):
    """The pipeline as a Prefect deployment on a cron schedule (served by `vqpipe serve`)."""
    return pipeline.to_deployment(name=name, cron=cron, parameters={"repo": str(Path(repo).resolve())})
