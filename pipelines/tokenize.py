"""Stage `tokenize`: every shard through the tokenizer on a pool of Ray actors -> Parquet parts.

    dvc repro tokenize          # or: python -m pipelines.tokenize

One `data/tokens/part-{shard}.parquet` per input shard (zstd; tokenizer fingerprint, codebook
size and grid in the schema metadata), each written under a temporary name and renamed when
complete, and `_manifest.json` with the row counts. Each actor loads the tokenizer once; set
`tokenize.num_gpus_per_actor` to place them on GPU workers (RAY_ADDRESS joins a cluster).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from components.config import TokenizeConfig
from components.data import shards as shard_io
from components.data import tokens as token_io
from components.data.tokenization import ShardTokens, tokenize_shard
from components.tokenizers import Tokenizer
from pipelines.common import Paths, init_ray, resolve_device, stage_main, stage_run

log = logging.getLogger("vqpipe.tokenize")


class TokenizeWorker:
    """A Ray actor holding one loaded tokenizer; tokenizes whole shards."""

    def __init__(self, tokenizer_dir: str, device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.tokenizer = Tokenizer.load(tokenizer_dir, device=resolve_device(device))

    def tokenize(self, shard_url: str, out_dir: str, batch_size: int) -> ShardTokens:
        return tokenize_shard(self.tokenizer, shard_url, out_dir, batch_size)


@dataclass
class TokenizeResult:
    out_dir: Path
    manifest: dict


def run(cfg: TokenizeConfig, paths: Paths = Paths()) -> TokenizeResult:
    with stage_run("tokenize", cfg) as active:
        import mlflow

        shard_manifest = shard_io.read_manifest(paths.shards)
        # Absolute paths: Ray workers of a cluster do not share this process's working directory.
        shard_dir = paths.shards.resolve()
        shards = [(s["split"], str(shard_dir / s["name"])) for s in shard_manifest["shards"]]
        tokenizer = Tokenizer.load(paths.tokenizer)
        out_dir = paths.tokens
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)

        results = _tokenize_on_ray(cfg, paths.tokenizer, [url for _, url in shards], out_dir)
        split_of = {url: split for split, url in shards}
        parts = [
            {**asdict(r), "split": split_of[r.input_shard], "input_shard": _portable(r.input_shard, paths.root)}
            for r in sorted(results, key=lambda r: r.part)
        ]
        manifest = {
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "codebook_size": tokenizer.codebook_size,
            "grid": {name: list(grid) for name, grid in tokenizer.column_grids.items()},
            "levels": [tokenizer.level_columns(level) for level in tokenizer.levels],
            "classes": shard_manifest.get("classes"),
            "rows": {split: sum(p["rows"] for p in parts if p["split"] == split) for split in ("train", "val")},
            "rejected": sum(len(p["rejects"]) for p in parts),
            "parts": parts,
        }
        token_io.write_manifest(out_dir, manifest)
        mlflow.log_metrics(
            {"train_rows": manifest["rows"]["train"], "val_rows": manifest["rows"]["val"], "rejected": manifest["rejected"], "parts": len(parts)}
        )
        mlflow.set_tag("vqpipe.tokenizer_fingerprint", tokenizer.fingerprint)
        log.info("wrote %d parts (%s rows) to %s (run %s)", len(parts), manifest["rows"], out_dir, active.info.run_id)
        return TokenizeResult(out_dir, manifest)


def _portable(path: str, root: Path) -> str:
    """A shard path relative to the project when it lies inside it: manifests stay valid when
    the project moves (and DVC sees the same output wherever it was made)."""
    try:
        return Path(path).relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def _tokenize_on_ray(cfg: TokenizeConfig, tokenizer_dir: Path, shard_urls: list[str], out_dir: Path) -> list[ShardTokens]:
    ray = init_ray()
    from ray.util import ActorPool

    actor_cls = ray.remote(TokenizeWorker).options(num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor)
    count = max(1, min(cfg.num_actors, len(shard_urls)))
    # An actor with no GPU reserved stays on the CPU under `auto`: otherwise every actor on a
    # GPU machine would pile onto the same device Ray never gave it.
    device = cfg.device if cfg.num_gpus_per_actor > 0 or cfg.device != "auto" else "cpu"
    actors = [actor_cls.remote(str(tokenizer_dir.resolve()), device, int(cfg.num_cpus_per_actor)) for _ in range(count)]
    pool = ActorPool(actors)
    jobs = [(url, str(out_dir.resolve()), cfg.batch_size) for url in shard_urls]
    try:
        return list(pool.map_unordered(lambda actor, job: actor.tokenize.remote(*job), jobs))
    finally:
        for actor in actors:
            ray.kill(actor)


def main() -> None:
    stage_main("tokenize", run)


if __name__ == "__main__":
    main()
