"""Stage `tokenize`: the pipeline's shards -> data/tokens, one Parquet token part per shard.

    dvc repro tokenize          # or: python -m pipelines.tokenize

The corpus tokenizer does the work (`pipelines.corpus`, the same as `vqpipe tokenize`); the
stage adds what the pipeline's later stages read besides the parts: each part's split, the
class names and the rows per split, in `_manifest.json`. Every setting of the stage is a
runtime one: the parts are the same whatever the batch size or the number of actors.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.config import TokenizeConfig
from components.data import shards as shard_io
from pipelines.corpus import CorpusJob, tokenize_corpus
from pipelines.runtime import Paths, stage_main
from pipelines.tracking import shards_input, stage_run

log = logging.getLogger("vqpipe.tokenize")


@dataclass
class TokenizeResult:
    out_dir: Path
    manifest: dict


def run(cfg: TokenizeConfig, paths: Paths = Paths()) -> TokenizeResult:
    with stage_run("tokenize", cfg, [shards_input(paths.shards, "tokenization")]) as active:
        import mlflow

        shard_manifest = shard_io.read_manifest(paths.shards)
        # Absolute paths to read (Ray actors do not share this process's working directory),
        # project-relative names to record: the manifest stays valid when the project moves.
        shard_dir = paths.shards.resolve()
        entries = [(s["split"], str(shard_dir / s["name"])) for s in shard_manifest["shards"]]
        names = {url: _portable(url, paths.root) for _, url in entries}
        if paths.tokens.exists():
            shutil.rmtree(paths.tokens)
        job = CorpusJob(
            inputs=[url for _, url in entries],
            output=str(paths.tokens),
            tokenizer=str(paths.tokenizer),
            batch_size=cfg.batch_size,
            actors=cfg.actors,
            cpus_per_actor=cfg.cpus_per_actor,
            gpus_per_actor=cfg.gpus_per_actor,
            device=cfg.device,
            overwrite=True,
            names=names,
        )
        split_of = {names[url]: split for split, url in entries}
        lineage = _lineage(paths, shard_manifest)
        result = tokenize_corpus(job, annotate=lambda manifest: _annotate(manifest, split_of, shard_manifest, lineage))
        if result.failed:
            raise RuntimeError(
                "shards could not be read: " + "; ".join(f"{f['input_shard']}: {f['error']}" for f in result.failed)
            )
        manifest = result.manifest
        splits = manifest["splits"]
        mlflow.log_metrics(
            {
                "train_rows": splits["train"]["rows"],
                "val_rows": splits["val"]["rows"],
                "rejected": manifest["rejected"],
                "parts": len(manifest["parts"]),
                "images_per_second": result.images_per_second,
            }
        )
        mlflow.set_tag("vqpipe.tokenizer_fingerprint", manifest["tokenizer_fingerprint"])
        parts, rows, run_id = len(manifest["parts"]), manifest["rows"], active.info.run_id
        log.info("wrote %d parts (%d rows) to %s (run %s)", parts, rows, paths.tokens, run_id)
        return TokenizeResult(paths.tokens, manifest)


def _lineage(paths: Paths, shard_manifest: dict) -> dict:
    """Where the tokens came from, for `vqpipe export`'s meta.json: the source's description and
    fingerprint (the source_fingerprint stage's digest), the shard manifest's sha256."""
    fingerprint = None
    if paths.source_fingerprint.is_file():
        fingerprint = json.loads(paths.source_fingerprint.read_text()).get("digest")
    return {
        "source": shard_manifest.get("source"),
        "source_fingerprint": fingerprint,
        "shard_manifest_sha256": shard_io.sha256_file(paths.shards / shard_io.MANIFEST),
    }


def _annotate(manifest: dict, split_of: dict[str, str], shard_manifest: dict, lineage: dict) -> None:
    """What the pipeline's later stages read besides the parts: each part's split, the class
    names, the rows per split; and the tokens' lineage."""
    manifest["lineage"] = lineage
    for part in manifest["parts"]:
        part["split"] = split_of[part["input_shard"]]
    manifest["classes"] = shard_manifest.get("classes")
    manifest["splits"] = {
        split: {"rows": sum(p["rows"] for p in manifest["parts"] if p["split"] == split)} for split in ("train", "val")
    }


def _portable(path: str, root: Path) -> str:
    """A shard path relative to the project when it lies inside it: manifests stay valid when
    the project moves (and DVC sees the same output wherever it was made)."""
    try:
        return Path(path).relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def main() -> None:
    stage_main("tokenize", run)


if __name__ == "__main__":
    main()
