"""Ray: starting or joining a cluster, and running a training recipe on Ray Train workers."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from pydantic import BaseModel

from pipelines.runtime import resolve_device, setup_logging


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


def train(worker: Callable, cfg: BaseModel, job, stage: str) -> None:
    """Run `worker(cfg, job, rank, world_size, device)`: in this process on `cfg.device` when
    `cfg.ddp_workers` is 1, else on Ray Train workers (`train_on_ray`)."""
    if cfg.ddp_workers == 1:
        worker(cfg, job, rank=0, world_size=1, device=resolve_device(cfg.device))
    else:
        train_on_ray(worker, cfg, job, stage)


def train_on_ray(worker: Callable, cfg: BaseModel, job, stage: str) -> None:
    """Run `worker(cfg, job, rank, world_size, device)` on `cfg.ddp_workers` Ray Train workers
    (DDP over gloo, or NCCL on GPUs; `use_gpu: auto` when the cluster has a GPU per worker).
    `job` is a dataclass of plain values (it travels) with `run_id`, `tracking_uri`,
    `checkpoint_dir` and `staging`: each worker gets it with a staging directory of its own, and
    what rank 0 writes there (its export) is copied into `job.staging`. Ray's copy is kept under
    checkpoint_dir/ray while the run lasts: on a multi-node cluster that must be storage every
    node sees."""
    ray = init_ray()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers, resources = cfg.ddp_workers, ray.cluster_resources()
    gpu = cfg.use_gpu if isinstance(cfg.use_gpu, bool) else resources.get("GPU", 0) >= workers
    if workers > resources.get("CPU", 0):
        cpus = resources.get("CPU", 0)
        raise RuntimeError(f"{stage}.ddp_workers={workers} but the Ray cluster has {cpus:.0f} CPUs")
    logging.getLogger(f"vqpipe.{stage}").info(
        "training on %d Ray Train workers (%s)", workers, "NCCL, GPUs" if gpu else "gloo, CPUs"
    )
    name = f"{stage}-{job.run_id}"
    loop_config = {"worker": worker, "cfg": cfg, "job": job, "use_gpu": gpu, "stage": stage}
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
        run_config=RunConfig(name=name, storage_path=str(Path(job.checkpoint_dir) / "ray")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without rank 0's export: {result.error}")
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(directory, job.staging, dirs_exist_ok=True)
    # Ray's copy of the export served its purpose; the training checkpoint is the stage's own.
    shutil.rmtree(Path(job.checkpoint_dir) / "ray" / name, ignore_errors=True)


def _ray_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    setup_logging()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    job = config["job"]
    os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
    with tempfile.TemporaryDirectory(prefix=f"vqpipe-{config['stage']}-rank{rank}-") as staging:
        config["worker"](config["cfg"], replace(job, staging=staging), rank, world_size, device)
        ray.train.report({"rank": rank}, checkpoint=Checkpoint.from_directory(staging) if rank == 0 else None)
