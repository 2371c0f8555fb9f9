"""The pipeline flow: one Prefect task per DVC stage, in DAG order.

Each task has DVC reproduce exactly its stage (`dvc repro --single-item`), so a fresh stage is
skipped by DVC, never by Prefect. One run at a time per project (`flows.lock`): the flow holds
the project lock from before its first stage to after its push. One MLflow parent run per flow
run, tagged with the Prefect flow-run id, carrying the project's params and the headline metrics
of `metrics/*.json` (whether their stages ran this time or not), so the experiment's runs table
compares pipeline runs directly; every stage that runs logs a nested run under it. After a
successful run the outputs are pushed to the DVC remote (`pipeline.push`), the run leaves a
Prefect markdown artifact with its results, and a failed run is reported to
`pipeline.notify_url` when one is set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from components.config import Params, load_params
from flows.dvc import STAGES, TRAINING_STAGES, listing_stages, repro_stage, stage_status
from flows.lock import note_flow_run, project_lock
from flows.notify import notify_failure
from flows.remote import push
from pipelines.tracking import PARENT_RUN_ENV, flatten, headline_metrics, log_run_params, tracking_uri, use_experiment


@task(task_run_name="{stage}")
def reproduce(stage: str, repo: str, env: dict[str, str], force: bool = False) -> dict:
    """Reproduce one stage through DVC; returns {"stage", "ran", "reasons"}."""
    logger = get_run_logger()
    reasons = stage_status(repo, stage).get(stage, [])
    logger.info("%s: %s", stage, "; ".join(reasons) if reasons else "up to date per DVC")
    ran = repro_stage(repo, stage, env, on_line=lambda line: logger.info("[%s] %s", stage, line), force=force)
    logger.info("%s: %s", stage, "ran" if ran else "skipped by DVC (unchanged)")
    return {"stage": stage, "ran": ran, "reasons": reasons}


@task(retries=2, retry_delay_seconds=10)  # a remote is I/O: it may fail and then work
def push_outputs(repo: str) -> str:
    logger = get_run_logger()
    summary = push(repo, on_line=lambda line: logger.info("[dvc push] %s", line))
    logger.info("outputs pushed to the DVC remote: %s", summary)
    return summary


@flow(name="vqpipe-pipeline", log_prints=True)
def pipeline(repo: str = ".", stages: list[str] | None = None, force: bool = False, wait: bool = True) -> dict:
    """Run the pipeline's stages (all by default) in DAG order through DVC, holding the project
    lock (`wait=False`: fail at once with ProjectBusy when another run holds it).

    Returns {"mlflow_run_id", "flow_run_id", "stages": [{"stage", "ran", "reasons"}, ...], "pushed"}."""
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")  # invalid params fail here, before any stage runs
    unknown = set(stages or []) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)} (allowed: {', '.join(STAGES)})")
    wanted = set(stages or STAGES) | listing_stages(stages or STAGES)
    chosen = [s for s in STAGES if s in wanted]
    logger = get_run_logger()
    flow_run_id = str(flow_run.id) if flow_run.id else ""
    with project_lock(root, wait=wait, command="vqpipe-pipeline flow", on_wait=logger.info):
        note_flow_run(root, flow_run_id, str(flow_run.name or ""))
        try:
            return _run_stages(root, params, chosen, force, flow_run_id)
        except BaseException as err:
            if params.pipeline.notify_url and not isinstance(err, KeyboardInterrupt):
                notify_failure(params.pipeline.notify_url, root, flow_run_id, str(flow_run.name or ""), err)
            raise


def _run_stages(root: Path, params: Params, chosen: list[str], force: bool, flow_run_id: str) -> dict:
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    experiment = use_experiment()
    tags = {
        "prefect.flow_run_id": flow_run_id,
        "prefect.flow_run_name": str(flow_run.name or ""),
        "vqpipe.stage": "pipeline",
    }
    with mlflow.start_run(run_name=f"pipeline-{flow_run.name or 'local'}", tags=tags) as parent:
        # Every setting, `section.key`: the runs table gets a column for each.
        log_run_params(mlflow.tracking.MlflowClient(), parent.info.run_id, flatten("", params))
        env = {
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_EXPERIMENT_NAME": experiment.name,
            PARENT_RUN_ENV: parent.info.run_id,
        }
        results = []
        try:
            for stage in chosen:
                # A stage that resumes from its checkpoint gets retried: a lost worker or a killed
                # process costs the steps since the last checkpoint, not the run.
                task_ = (
                    reproduce.with_options(retries=1, retry_delay_seconds=10) if stage in TRAINING_STAGES else reproduce
                )
                results.append(task_(stage, str(root), env, force))
        finally:
            mlflow.set_tag("vqpipe.stages_ran", ",".join(r["stage"] for r in results if r["ran"]) or "none")
            metrics = headline_metrics(root)
            if metrics:
                mlflow.log_metrics(metrics)
        pushed = push_outputs(str(root)) if params.pipeline.push else "not pushed (pipeline.push: false)"
        mlflow.set_tag("vqpipe.pushed", pushed)
    _artifact(root, results, metrics, parent.info.run_id, uri, pushed)
    return {"mlflow_run_id": parent.info.run_id, "flow_run_id": flow_run_id, "stages": results, "pushed": pushed}


def _artifact(root: Path, results: list[dict], metrics: dict[str, float], run_id: str, uri: str, pushed: str) -> None:
    """A markdown artifact on the flow run: what ran, the evaluate metrics, where the MLflow run is."""
    lines = [f"# vqpipe pipeline: {root}", "", "| stage | result |", "|---|---|"]
    lines += [f"| {r['stage']} | {'ran' if r['ran'] else 'skipped (unchanged)'} |" for r in results]
    evaluate = {k.removeprefix("evaluate."): v for k, v in metrics.items() if k.startswith("evaluate.")}
    if evaluate:
        lines += ["", "## evaluate", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(evaluate.items())]
    lines += ["", f"MLflow run `{run_id}` in `{uri}`", "", f"DVC remote: {pushed}"]
    try:
        create_markdown_artifact(markdown="\n".join(lines), key="vqpipe-pipeline", description="stage results")
    except Exception as err:  # the run's work is done; an artifact the API refused is not worth failing it
        logging.getLogger("vqpipe").warning("Prefect artifact not written: %s", err)


def scheduled_deployment(
    repo: str, cron: str | None = None, interval: float | None = None, name: str = "vqpipe-scheduled"
):
    """The pipeline as a Prefect deployment on a cron or interval schedule (served by `vqpipe
    serve`), one flow run at a time: a run due while the last still runs waits for it."""
    return pipeline.to_deployment(
        name=name,
        cron=cron,
        interval=interval,
        concurrency_limit=1,
        parameters={"repo": str(Path(repo).resolve())},
    )
