"""What every stage shares: loading its params section, paths, devices, MLflow runs, Ray.

MLflow nesting: when the Prefect flow runs a stage through `dvc repro`, it passes its parent
run's id in VQPIPE_MLFLOW_PARENT_RUN_ID and the stage's run is created as its child. A stage run
by hand (`dvc repro train_prior`) gets a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from components.config import ConfigError, Params, load_params

PARENT_RUN_ENV = "VQPIPE_MLFLOW_PARENT_RUN_ID"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
EXPORT_FILES = ("config.json", "model.safetensors")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "vqpipe"


class Paths:
    """Where the stages read and write, relative to a project root (the DVC repo)."""

    def __init__(self, root: str | Path = "."):
        root = Path(root)
        self.root = root
        self.shards = root / "data" / "shards"
        self.tokens = root / "data" / "tokens"
        self.tokenizer = root / "models" / "tokenizer"
        self.prior = root / "models" / "prior"
        self.samples = root / "samples"
        self.eval = root / "eval"
        self.metrics = root / "metrics"
        self.plots = root / "plots"

    def within(self, path: str | Path) -> Path:
        """`path` as given when absolute, else under the project root (absolute either way)."""
        path = Path(path)
        return path if path.is_absolute() else (self.root / path).resolve()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(section: str, run: Callable, params_path: str = "params.yaml") -> None:
    """Entry point of `python -m pipelines.<stage>`: params errors exit 2 before any work."""
    setup_logging()
    try:
        params: Params = load_params(params_path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    run(getattr(params, section))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto|fp32|bf16) on `device`; None means fp32.

    auto picks bf16 only where it is computed natively: emulated bf16 is slower than fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_native_bf16() else None


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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


def fetch_export(spec: str, dest: str | Path, kind: str) -> Path:
    """The local directory of an export (`config.json` + `model.safetensors`: a tokenizer or a
    prior) that `spec` names: a directory as it is, or an MLflow model or artifact URI
    (`models:/name@alias`, `models:/name/3`, `runs:/id/prior`) downloaded into `dest` from the
    tracking server MLFLOW_TRACKING_URI points at. ValueError when it is not one."""
    if spec.startswith(MLFLOW_SCHEMES):
        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
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


@contextlib.contextmanager
def stage_run(stage: str, cfg: BaseModel | None = None) -> Iterator[mlflow.ActiveRun]:  # noqa: F821
    """An MLflow run for a stage, nested under the pipeline's run when there is one."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"vqpipe.stage": stage}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags) as active:
        if cfg is not None:
            mlflow.log_params(flatten(stage, cfg))
        yield active


class MetricLogger:
    """Per-step metrics, sent to MLflow in batches (one request per `flush_every` steps rather
    than one per value) and kept for the stage's DVC plot CSV."""

    def __init__(self, run_id: str, flush_every: int = 25):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list = []
        self.history: list[dict] = []

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in values.items()}
        self.pending += [Metric(k, v, now, step) for k, v in values.items()]
        self.history.append({"step": step, **values})
        if len(self.pending) >= self.flush_every * max(len(values), 1):
            self.flush()

    def last(self, key: str) -> float | None:
        """The most recent value logged under `key`."""
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return None

    def flush(self) -> None:
        while self.pending:
            chunk, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def write_csv(self, path: str | Path, keys: list[str]) -> None:
        """One row per step that logged `keys[0]`, for `dvc plots`; a later key logged at the
        same step (a validation value, say) joins its row, and is blank where there was none."""
        by_step: dict[int, dict] = {}
        for row in self.history:
            by_step.setdefault(row["step"], {}).update(row)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", *keys])
            for step, row in sorted(by_step.items()):
                if keys[0] in row:
                    writer.writerow([step, *(f"{row[k]:.6g}" if k in row else "" for k in keys)])


def init_ray(num_cpus: int | None = None, address: str | None = None):
    """Join the cluster at `address` (`auto`, `host:port`, `ray://...`) or RAY_ADDRESS's when
    set, else start (or reuse) a local one without dashboard."""
    import ray

    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or None, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return ray


def train_on_ray(
    worker: Callable,
    cfg: BaseModel,
    job: dict,
    *,
    stage: str,
    workers: int,
    use_gpu: bool | str,
    checkpoint_dir: str,
    staging: str,
) -> None:
    """Run `worker(cfg_json, job, staging, rank, world_size, device)` on `workers` Ray Train
    workers (DDP over gloo, or NCCL on GPUs; `use_gpu: auto` when the cluster has a GPU per
    worker) and copy the directory rank 0 fills (its export) into `staging`. Ray's copy is kept
    under checkpoint_dir/ray while the run lasts: on a multi-node cluster that must be storage
    every node sees. `job` is plain values and holds `run_id` and `tracking_uri`."""
    ray = init_ray()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = ray.cluster_resources()
    gpu = use_gpu if isinstance(use_gpu, bool) else resources.get("GPU", 0) >= workers
    if workers > resources.get("CPU", 0):
        raise RuntimeError(f"{stage}.workers={workers} but the Ray cluster has {resources.get('CPU', 0):.0f} CPUs")
    logging.getLogger(f"vqpipe.{stage}").info(
        "training on %d Ray Train workers (%s)", workers, "NCCL, GPUs" if gpu else "gloo, CPUs"
    )
    name = f"{stage}-{job['run_id']}"
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "worker": worker,
            "cfg": cfg.model_dump(mode="json"),
            "job": job,
            "use_gpu": gpu,
            "stage": stage,
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
        run_config=RunConfig(name=name, storage_path=str(Path(checkpoint_dir) / "ray")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without rank 0's export: {result.error}")
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(directory, staging, dirs_exist_ok=True)
    # Ray's copy of the export served its purpose; the training checkpoint is the stage's own.
    shutil.rmtree(Path(checkpoint_dir) / "ray" / name, ignore_errors=True)


def _ray_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    setup_logging()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    os.environ["MLFLOW_TRACKING_URI"] = config["job"]["tracking_uri"]
    with tempfile.TemporaryDirectory(prefix=f"vqpipe-{config['stage']}-rank0-") as staging:
        config["worker"](config["cfg"], config["job"], staging, rank, world_size, device)
        ray.train.report({"rank": rank}, checkpoint=Checkpoint.from_directory(staging) if rank == 0 else None)
