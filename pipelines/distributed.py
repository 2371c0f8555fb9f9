"""Ray: starting or joining a cluster, and running a training recipe on Ray Train workers."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

from pipelines.runtime import setup_logging


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
