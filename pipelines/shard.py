"""Stage `shard`: images from a source -> WebDataset shards with a deterministic train/val split.

    dvc repro shard          # or: python -m pipelines.shard

Writes data/shards/{train,val}-NNNNNN.tar, manifest.json (counts and sha256 per shard) and
rejects.jsonl (each unusable input with its reason). Partitions are written in parallel Ray
tasks when there are at least `shard.ray_min_inputs` inputs, in process otherwise; both give
byte-identical shards.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.config import ShardConfig
from components.data.shards import Partition, PartitionResult, plan_partitions, write_manifest, write_partition
from components.data.sources import open_source
from pipelines.distributed import init_ray
from pipelines.runtime import Paths, stage_main
from pipelines.tracking import stage_run

log = logging.getLogger("vqpipe.shard")


@dataclass
class ShardResult:
    out_dir: Path
    manifest: dict


def run(cfg: ShardConfig, paths: Paths = Paths()) -> ShardResult:
    with stage_run("shard", cfg) as active:
        import mlflow

        source = open_source(cfg.source, cfg.num_images, cfg.seed)
        items, early_rejects = source.scan()
        partitions = plan_partitions(items, cfg.val_fraction, cfg.seed, cfg.samples_per_shard)
        out_dir = _fresh_dir(paths.shards)
        log.info(
            "%s: %d inputs, %d listed as unusable, %d partitions",
            source.description,
            len(items),
            len(early_rejects),
            len(partitions),
        )

        if len(items) >= cfg.ray_min_inputs:
            results = _write_with_ray(source, partitions, out_dir, cfg)
        else:
            results = [write_partition(source, p, out_dir, cfg.image_size, source.classes) for p in partitions]

        info = {
            "source": source.description,
            "image_size": cfg.image_size,
            "classes": source.classes,
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
        }
        manifest = write_manifest(out_dir, results, early_rejects, info)
        mlflow.log_metrics(
            {
                "inputs": manifest["inputs"],
                "train_samples": manifest["samples"]["train"],
                "val_samples": manifest["samples"]["val"],
                "rejected": manifest["rejected"],
                "shards": len(manifest["shards"]),
            }
        )
        mlflow.log_artifact(str(out_dir / "manifest.json"))
        mlflow.log_artifact(str(out_dir / "rejects.jsonl"))
        log.info(
            "wrote %d train + %d val samples in %d shards to %s; %d rejected (run %s)",
            manifest["samples"]["train"],
            manifest["samples"]["val"],
            len(manifest["shards"]),
            out_dir,
            manifest["rejected"],
            active.info.run_id,
        )
        return ShardResult(out_dir, manifest)


def _fresh_dir(path: Path) -> Path:
    """Shards of an earlier run must not survive next to this run's."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _write_with_ray(source, partitions: list[Partition], out_dir: Path, cfg: ShardConfig) -> list[PartitionResult]:
    ray = init_ray()
    write = ray.remote(num_cpus=1)(write_partition)
    limit = cfg.ray_tasks or int(ray.available_resources().get("CPU", 1)) or 1
    source_ref = ray.put(source)
    pending, results = [], []
    # At most `limit` partitions in flight: memory stays bounded however many there are.
    for partition in partitions:
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
        # Absolute path: Ray workers do not share this process's working directory.
        pending.append(write.remote(source_ref, partition, str(out_dir.resolve()), cfg.image_size, source.classes))
    results += ray.get(pending)
    return results


def main() -> None:
    stage_main("shard", run)


if __name__ == "__main__":
    main()
