"""Scratch projects for the benchmarks: built-in shapes sharded once, each run beside them."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from components.config import parse_params
from pipelines import shard
from pipelines.runtime import Paths


def shapes_project(images: int, prefix: str):
    """A scratch project (Paths) holding `images` built-in shapes as shards; MLflow logs to its
    own sqlite store."""

    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    base = Paths(work / "base")
    shard.run(parse_params({"shard": {"num_images": images}}).shard, base)
    return base


def sibling(base, name: str):
    """Another project next to `base`, reading its shards (a symlink): one run's outputs each."""

    paths = Paths(Path(base.root).parent / name)
    paths.shards.parent.mkdir(parents=True, exist_ok=True)
    paths.shards.symlink_to(Path(base.shards).resolve(), target_is_directory=True)
    return paths


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
