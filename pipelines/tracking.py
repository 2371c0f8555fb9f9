"""MLflow: the stage's run (nested under the pipeline's), per-step metrics, the model registry
and fetching exports from it.

MLflow nesting: when the Prefect flow runs a stage through `dvc repro`, it passes its parent
run's id in VQPIPE_MLFLOW_PARENT_RUN_ID and the stage's run is created as its child. Under
`dvc exp run` (`vqpipe exp run`), the stages of one DVC experiment share a parent run found by
the experiment's name, in the project's store even from DVC's temporary workspaces. A stage run
by hand (`dvc repro train_prior`) gets a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import yaml
from pydantic import BaseModel

from components.data.shards import sha256_file

PARENT_RUN_ENV = "VQPIPE_MLFLOW_PARENT_RUN_ID"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
EXPORT_FILES = ("config.json", "model.safetensors")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "vqpipe"
# The experiment is one of model training: MLflow's UI opens it on its runs table, not on GenAI traces.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def flatten(prefix: str, obj) -> dict[str, str]:
    """Nested params -> {"stage.key.sub": "value"} for mlflow.log_params."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: str(obj)}


def project_root(cwd: str | Path = ".") -> Path:
    """The project a stage works for: its workspace, or, when DVC runs an experiment in a
    temporary workspace (queued or `--temp`: `<project>/.dvc/tmp/exps/...`), the project that
    holds it, so the experiment's runs land in the project's MLflow store, not in a folder DVC
    deletes."""
    path = Path(cwd).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def tracking_uri(root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the project's own store: `mlflow.db` in the project (`root`,
    by default the one this process works for), as an absolute sqlite URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    return absolute_tracking_uri(uri, project_root(root if root is not None else "."))


def absolute_tracking_uri(uri: str, root: str | Path = ".") -> str:
    """A sqlite URI with a relative path made absolute (against `root`), so that other
    processes (DVC's, Ray's workers) find the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str((Path(root) / uri[len(prefix) :]).resolve())
    return uri


def fetch_export(spec: str, dest: str | Path, kind: str, root: str | Path = ".") -> Path:
    """The local directory of an export (`config.json` + `model.safetensors`: a tokenizer or a
    prior) that `spec` names: a directory as it is, or an MLflow model or artifact URI
    (`models:/name@alias`, `models:/name/3`, `runs:/id/prior`) downloaded into `dest` from the
    tracking server MLFLOW_TRACKING_URI points at, else the project's own store (`mlflow.db` in
    `root`, the project, wherever the command runs from). ValueError when it is not one."""
    if spec.startswith(MLFLOW_SCHEMES):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(root))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(dest)))
        except Exception as err:  # MlflowException and the store's own errors
            raise ValueError(f"cannot fetch {kind} {spec!r} from MLflow ({mlflow.get_tracking_uri()}): {err}") from err
        found = [p.parent for p in local.rglob(EXPORT_FILES[0]) if (p.parent / EXPORT_FILES[1]).is_file()]
        if not found:
            raise ValueError(f"{spec!r} holds no {kind} export ({' + '.join(EXPORT_FILES)})")
        return min(found, key=lambda p: len(p.parts))  # the export itself, not one nested in it
    path = Path(spec)
    if not all((path / name).is_file() for name in EXPORT_FILES):
        raise ValueError(f"{spec!r} is not a {kind} export: it needs {' and '.join(EXPORT_FILES)}")
    return path


def use_experiment(name: str | None = None):
    """Set (creating when needed) the run's experiment, marked as one of model training. Created
    in a local store, its artifacts go to the project's `mlruns/` (MLflow would put them under
    the working directory, which for a DVC experiment is a temporary one)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
        with contextlib.suppress(MlflowException):  # created meanwhile by another stage: found below
            mlflow.create_experiment(name, artifact_location=location)
    experiment = mlflow.set_experiment(name)
    key, value = EXPERIMENT_KIND_TAG
    if experiment.tags.get(key) != value:
        mlflow.set_experiment_tag(key, value)
    return experiment


class DatasetInput(NamedTuple):
    """What a stage read, as an MLflow dataset: `source` says where (a path or URL, or the
    source's description), `digest` what (a manifest's or listing's hash), `context` its role."""

    name: str
    source: str
    digest: str
    context: str = "training"


def shards_input(shards: Path, context: str = "training") -> DatasetInput:
    """The shard stage's output, named by its manifest's digest."""
    manifest = Path(shards) / "manifest.json"
    source = json.loads(manifest.read_text()).get("source", "")
    return DatasetInput("shards", f"{Path(shards).resolve()} (from {source})", sha256_file(manifest), context)


def tokens_input(tokens: Path, context: str = "training") -> DatasetInput:
    """The tokenize stage's output, named by its manifest's digest."""
    return DatasetInput("tokens", str(Path(tokens).resolve()), sha256_file(Path(tokens) / "_manifest.json"), context)


def _log_inputs(inputs: Sequence[DatasetInput]) -> None:
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    for item in inputs:
        # MLflow keeps 36 characters of a digest; the source is described, never read back.
        dataset = MetaDataset(CodeDatasetSource({"source": item.source}), name=item.name, digest=item.digest[:32])
        mlflow.log_input(dataset, context=item.context)


@contextlib.contextmanager
def stage_run(
    stage: str, cfg: BaseModel | None = None, inputs: Sequence[DatasetInput] = ()
) -> Iterator[mlflow.ActiveRun]:  # noqa: F821
    """An MLflow run for a stage, nested under the pipeline's run when there is one, with the
    datasets it reads (`inputs`) logged as its MLflow inputs."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = use_experiment()
    parent = os.environ.get(PARENT_RUN_ENV) or None
    experiment_run = None if parent else dvc_experiment_run(experiment.experiment_id)
    tags = {"vqpipe.stage": stage}
    status = "FAILED"
    try:
        with mlflow.start_run(
            run_name=stage, parent_run_id=parent or experiment_run, nested=bool(parent or experiment_run), tags=tags
        ) as active:
            if cfg is not None:
                mlflow.log_params(flatten(stage, cfg))
            _log_inputs(inputs)
            yield active
        status = "FINISHED"
    finally:
        if experiment_run is not None:
            _close_experiment_run(experiment_run, status)


DVC_EXP_TAG = "vqpipe.dvc_exp"


def dvc_experiment_run(experiment_id: str) -> str | None:
    """Under `dvc exp run` (DVC_EXP_NAME set): the MLflow parent run of that DVC experiment,
    found by its tags or started. It carries the experiment's name, baseline commit, every param
    and the ones the experiment changed (`vqpipe.dvc_exp_changed`: `key=value, ...`); after each
    stage, the headline metrics of the metrics files. None outside an experiment."""
    from mlflow.tracking import MlflowClient

    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return None
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    client = MlflowClient()
    query = f"tags.`{DVC_EXP_TAG}` = '{name}' and tags.`vqpipe.stage` = 'pipeline'"
    for run in client.search_runs([experiment_id], query, max_results=10, order_by=["attributes.start_time DESC"]):
        if run.data.tags.get("vqpipe.dvc_exp_baseline", "") == baseline:
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    params = yaml.safe_load(Path("params.yaml").read_text()) or {}
    changed = changed_params(params, baseline)
    tags = {
        "vqpipe.stage": "pipeline",
        DVC_EXP_TAG: name,
        "vqpipe.dvc_exp_baseline": baseline,
        "vqpipe.dvc_exp_changed": ", ".join(f"{k}={v}" for k, v in changed.items()) or "none",
    }
    run = client.create_run(experiment_id, run_name=f"exp-{name}", tags=tags)
    log_run_params(client, run.info.run_id, flatten("", params))
    return run.info.run_id


def changed_params(params: dict, baseline: str) -> dict[str, str]:
    """{"train_prior.lr": "0.001"}: the params that differ from the baseline commit's params.yaml
    (git, in the experiment's workspace); empty when the baseline cannot be read."""
    try:
        shown = subprocess.run(
            ["git", "show", f"{baseline}:params.yaml"], capture_output=True, text=True, check=True, timeout=60
        )
        before = flatten("", yaml.safe_load(shown.stdout) or {})
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        return {}
    after = flatten("", params)
    return {k: v for k, v in sorted(after.items()) if before.get(k) != v}


def metric_files(root: str | Path) -> dict[str, Path]:
    """{stage: its metrics file} as the project's dvc.yaml lists them (one JSON file per stage)."""
    stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    return {
        name: Path(root) / (next(iter(entry)) if isinstance(entry, dict) else entry)
        for name, stage in stages.items()
        for entry in stage.get("metrics", [])[:1]
    }


def headline_metrics(root: str | Path) -> dict[str, float]:
    """{"evaluate.psnr": 23.9, ...}: the numbers of the project's metrics files as the workspace
    has them now (a stage DVC skipped keeps its last run's), keyed `stage.key`."""
    found = {}
    for stage, path in metric_files(root).items():
        try:
            found[stage] = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
    return metric_numbers(found)


def metric_numbers(by_stage: dict[str, dict]) -> dict[str, float]:
    """{"evaluate.psnr": 23.9, ...} from each stage's metrics: the numbers, keyed `stage.key`."""
    metrics = {}
    for stage, values in by_stage.items():
        for key, value in flatten(stage, values).items():
            try:
                metrics[key] = float(value)
            except ValueError:
                continue  # labels (the feature space FID was measured in, say), lists
    return metrics


def _close_experiment_run(run_id: str, status: str) -> None:
    """A DVC experiment's parent run after one of its stages: the workspace's headline metrics
    logged (every stage's, those DVC restored from its cache too), then finished or failed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    metrics = headline_metrics(".")
    if metrics:
        log_run_metrics(client, run_id, metrics)
    client.set_terminated(run_id, status)


class MetricLogger:
    """Per-step metrics, sent to MLflow in batches (one request per `flush_every` steps rather
    than one per value) and appended to a history file (JSON lines, one per `log`) for the
    stage's DVC plot CSV. Memory holds the latest value of each key, never the history: a
    checkpoint records how many lines the history had (`rows`), and `resume` cuts it back there."""

    def __init__(self, run_id: str, history: str | Path, flush_every: int = 25):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list = []
        self.history = Path(history)
        self.history.parent.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []  # not yet in the history file
        self.rows = 0  # lines logged, in the file or pending
        self.latest: dict[str, float] = {}

    def resume(self, rows: int, legacy: list[dict] | None = None) -> None:
        """Call before logging: keep the history's first `rows` lines (what the checkpoint
        resumed from saw; 0 to start over) and drop the rest. A checkpoint of vqpipe <= 0.2
        holds its history itself (`legacy`), which becomes the file."""
        self.lines, self.rows, self.latest = [], 0, {}
        if legacy is not None:
            self.history.write_text("".join(json.dumps(row) + "\n" for row in legacy))
            rows = len(legacy)
        if not self.history.exists():
            self.history.touch()
        with open(self.history, "r+b") as f:
            for _ in range(rows):
                line = f.readline()
                if not line:
                    break
                self.latest.update({k: v for k, v in json.loads(line).items() if k != "step"})
                self.rows += 1
            f.truncate(f.tell())

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in values.items()}
        self.pending += [Metric(k, v, now, step) for k, v in values.items()]
        self.lines.append(json.dumps({"step": step, **values}) + "\n")
        self.rows += 1
        self.latest.update(values)
        if len(self.pending) >= self.flush_every * max(len(values), 1):
            self.flush()

    def last(self, key: str) -> float | None:
        """The most recent value logged under `key`."""
        return self.latest.get(key)

    def flush(self) -> None:
        """Send the pending metrics to MLflow and append them to the history file."""
        while self.pending:
            chunk, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)
        if self.lines:
            with open(self.history, "a") as f:
                f.writelines(self.lines)
            self.lines = []

    def write_csv(self, path: str | Path, keys: list[str]) -> None:
        """One row per step that logged `keys[0]`, for `dvc plots`; a later key logged at the
        same step (a validation value, say) joins its row, and is blank where there was none.
        Streams the history (steps are logged in order)."""
        self.flush()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as out, open(self.history) as history:
            writer = csv.writer(out)
            writer.writerow(["step", *keys])

            def emit(row: dict | None) -> None:
                if row is not None and keys[0] in row:
                    writer.writerow([row["step"], *(f"{row[k]:.6g}" if k in row else "" for k in keys)])

            current: dict | None = None
            for line in history:
                row = json.loads(line)
                if current is not None and row["step"] == current["step"]:
                    current.update(row)
                    continue
                emit(current)
                current = row
            emit(current)


def log_run_params(client, run_id: str, values: dict) -> None:
    """Params of a run beyond a stage's own section: what comes from the work (parameter
    counts, devices), or a pipeline run's every setting. In requests of 100, MLflow's limit."""
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in values.items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])


def log_run_metrics(client, run_id: str, values: dict[str, float]) -> None:
    """Metrics of a run at once (step 0), in requests of 1000, MLflow's limit."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items()]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def system_metrics(run_id: str, tracking_uri: str):
    """CPU, memory, GPU, disk and network of this machine, every 10 s, into the run; None (and
    training goes on) where they cannot be read. `.finish()` stops it."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as err:  # psutil missing, or an unsupported platform
        logging.getLogger("vqpipe").warning("system metrics not logged: %s", err)
        return None
