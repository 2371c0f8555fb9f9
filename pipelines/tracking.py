"""MLflow: the stage's run (nested under the pipeline's), per-step metrics, the model registry
and fetching exports from it.

MLflow nesting: when the Prefect flow runs a stage through `dvc repro`, it passes its parent
run's id in VQPIPE_MLFLOW_PARENT_RUN_ID and the stage's run is created as its child. A stage run
by hand (`dvc repro train_prior`) gets a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel

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

        mlflow.set_tracking_uri(
            absolute_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI), root)
        )
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


def register_export(name: str, run_id: str, artifact_path: str, fingerprint: str, description: str) -> str:
    """A new version of the MLflow registered model `name` whose source is the run's
    `artifact_path` artifacts (an export directory, not an MLflow-flavoured model, which MLflow
    3's `register_model` refuses: `create_model_version` registers it as it is). Returns the
    version; give it an alias to use it as `models:/NAME@ALIAS`."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"{description} (config.json + model.safetensors)")
    source = mlflow.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags={"vqpipe.tokenizer_fingerprint": fingerprint}
    )
    return version.version


def use_experiment(name: str | None = None):
    """Set (creating when needed) the run's experiment, marked as one of model training."""
    import mlflow

    experiment = mlflow.set_experiment(name or os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
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


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shards_input(shards: Path, context: str = "training") -> DatasetInput:
    """The shard stage's output, named by its manifest's digest."""
    manifest = Path(shards) / "manifest.json"
    source = json.loads(manifest.read_text()).get("source", "")
    return DatasetInput("shards", f"{Path(shards).resolve()} (from {source})", file_digest(manifest), context)


def tokens_input(tokens: Path, context: str = "training") -> DatasetInput:
    """The tokenize stage's output, named by its manifest's digest."""
    return DatasetInput("tokens", str(Path(tokens).resolve()), file_digest(Path(tokens) / "_manifest.json"), context)


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

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    use_experiment()
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"vqpipe.stage": stage}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags) as active:
        if cfg is not None:
            mlflow.log_params(flatten(stage, cfg))
        _log_inputs(inputs)
        yield active


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
