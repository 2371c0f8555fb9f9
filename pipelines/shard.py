"""Stage `shard`: images from a source -> WebDataset shards with a deterministic train/val split.

    dvc repro shard          # or: python -m pipelines.shard

Sources: `builtin:shapes`, `folder:PATH`, `webdataset:SPEC` (tar shards: brace patterns, globs,
fsspec URLs, `pipe:`, `@FILE` lists) and `parquet:SPEC` (Hugging Face image datasets); see
components/data/sources.py. Writes data/shards/{train,val}-NNNNNN.tar, manifest.json (counts and
sha256 per shard, caption counts, the inputs that could not be read) and rejects.jsonl (each
unusable input with its reason). Units (an input shard or file; for listed sources, a shard's
worth of inputs) are written in parallel Ray tasks when there are at least
`shard.ray_min_inputs` inputs, in process otherwise; both give byte-identical shards. An input
that cannot be read is retried, then listed; the stage fails when more than
`shard.max_unreadable` of them could not be read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from components.config import ShardConfig
from components.data.shard_writer import ShardLayout, UnitResult, plan_units, write_unit
from components.data.shards import sha256_file, write_manifest
from components.data.sources import open_source
from components.data.units import SourceUnit
from pipelines.distributed import init_ray
from pipelines.runtime import Paths, stage_main
from pipelines.tracking import DatasetInput, stage_run

log = logging.getLogger("vqpipe.shard")


@dataclass
class ShardResult:
    out_dir: Path
    manifest: dict


class TooManyUnreadable(RuntimeError):
    """More of the source's inputs could not be read than `shard.max_unreadable` allows."""


def run(cfg: ShardConfig, paths: Paths = Paths()) -> ShardResult:
    source = open_source(cfg)  # a missing column, a pattern that matches nothing: before any work
    with stage_run("shard", cfg, [_source_input(source.description, paths)]) as active:
        import mlflow

        units, early_rejects = source.units(
            lambda items: plan_units(items, cfg.val_fraction, cfg.seed, cfg.samples_per_shard)
        )
        layout = ShardLayout(
            image_size=cfg.image_size,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            samples_per_shard=cfg.samples_per_shard,
            image_format=cfg.image_format,
            max_caption_chars=cfg.max_caption_chars,
            classes=tuple(source.classes) if source.classes else None,
            max_image_pixels=cfg.limits.max_image_pixels,
        )
        out_dir = _fresh_dir(paths.shards)
        inputs = _expected_inputs(units, cfg)
        log.info(
            "%s: %d units (~%d inputs), %d listed as unusable",
            *(source.description, len(units), inputs, len(early_rejects)),
        )
        if inputs >= cfg.ray_min_inputs and len(units) > 1:
            results = _write_with_ray(source, units, out_dir, layout, cfg)
        else:
            results = [write_unit(source, u, out_dir, layout, cfg.retries) for u in units]
        results.sort(key=lambda r: r.unit)

        info = {
            "source": source.description,
            "image_size": cfg.image_size,
            "image_format": cfg.image_format,
            "classes": source.classes,
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "units": len(units),
            "captions": _caption_counts(results),
        }
        failed = [{"input": r.name, "attempts": r.attempts, "error": r.error} for r in results if r.error]
        rejects = list(early_rejects) + [reject for r in results for reject in r.rejects]
        manifest = write_manifest(out_dir, _name_shards(out_dir, results), rejects, failed, info)
        _log(mlflow, out_dir, manifest)
        log.info(
            "wrote %d train + %d val samples in %d shards to %s; %d rejected, %d inputs unreadable (run %s)",
            *(manifest["samples"]["train"], manifest["samples"]["val"], len(manifest["shards"]), out_dir),
            *(manifest["rejected"], len(failed), active.info.run_id),
        )
        if failed and len(failed) > cfg.max_unreadable * len(units):
            listed = "\n  ".join(f"{f['input']}: {f['error']}" for f in failed[:20])
            raise TooManyUnreadable(
                f"{len(failed)} of {len(units)} inputs could not be read (more than shard.max_unreadable = "
                f"{cfg.max_unreadable:g}); they are listed in {out_dir / 'manifest.json'}:\n  {listed}"
            )
        return ShardResult(out_dir, manifest)


def _source_input(description: str, paths: Paths) -> DatasetInput:
    """The source, named by the listing `source_fingerprint` made of it (by its description
    when the stage runs alone, without one)."""
    listing = paths.source_fingerprint
    if listing.is_file():
        digest = json.loads(listing.read_text()).get("digest") or sha256_file(listing)
    else:
        digest = hashlib.sha256(description.encode()).hexdigest()
    return DatasetInput("source", description, digest, "sharding")


def _expected_inputs(units: list[SourceUnit], cfg: ShardConfig) -> int:
    """Inputs to expect: listed items where the source lists them, else samples_per_shard per unit."""
    return sum(len(u.ref) if isinstance(u.ref, list) else cfg.samples_per_shard for u in units)


def _name_shards(out_dir: Path, results: list[UnitResult]) -> list[dict]:
    """The staged tars renamed `{split}-{n:06d}.tar`, numbered in unit order; their entries."""
    numbers: Counter = Counter()
    entries = []
    for result in results:
        for shard in result.outputs:
            name = f"{shard.split}-{numbers[shard.split]:06d}.tar"
            numbers[shard.split] += 1
            os.replace(out_dir / shard.file, out_dir / name)
            entries.append(
                {
                    "name": name,
                    "split": shard.split,
                    "inputs": shard.inputs,
                    "samples": shard.samples,
                    "rejected": shard.rejected,
                    "sha256": shard.sha256,
                }
            )
    return sorted(entries, key=lambda e: e["name"])


def _caption_counts(results: list[UnitResult]) -> dict:
    total: Counter = Counter()
    for r in results:
        total.update(r.captions)
    return {k: total.get(k, 0) for k in ("written", "invalid_utf8", "truncated")}


def _log(mlflow, out_dir: Path, manifest: dict) -> None:
    mlflow.log_metrics(
        {
            "inputs": manifest["inputs"],
            "train_samples": manifest["samples"]["train"],
            "val_samples": manifest["samples"]["val"],
            "rejected": manifest["rejected"],
            "unreadable_inputs": len(manifest["failed"]),
            "shards": len(manifest["shards"]),
            "captions_truncated": manifest["captions"]["truncated"],
            "captions_invalid_utf8": manifest["captions"]["invalid_utf8"],
        }
    )
    mlflow.log_artifact(str(out_dir / "manifest.json"))
    mlflow.log_artifact(str(out_dir / "rejects.jsonl"))


def _fresh_dir(path: Path) -> Path:
    """Shards of an earlier run must not survive next to this run's."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _write_with_ray(source, units: list[SourceUnit], out_dir: Path, layout: ShardLayout, cfg: ShardConfig):
    ray = init_ray()
    write = ray.remote(num_cpus=1)(write_unit)
    limit = cfg.ray_tasks or int(ray.available_resources().get("CPU", 1)) or 1
    source_ref = ray.put(source)
    pending, results = [], []
    # At most `limit` units in flight: memory stays bounded however many there are.
    for unit in units:
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
        # Absolute path: Ray workers do not share this process's working directory.
        pending.append(write.remote(source_ref, unit, str(out_dir.resolve()), layout, cfg.retries))
    results += ray.get(pending)
    return results


def main() -> None:
    stage_main("shard", run)


if __name__ == "__main__":
    main()
