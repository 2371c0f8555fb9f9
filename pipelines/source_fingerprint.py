"""Stage `source_fingerprint`: what the shard stage's source holds, listed cheaply.

    dvc repro source_fingerprint       # or: python -m pipelines.source_fingerprint [--print]

DVC cannot hash a corpus of terabytes, nor one on an object store, and a stage cannot depend
on a file its own run writes. So this stage runs every time (`always_changed`) and lists the
source without reading it: every input's name, size and version (modification time, or the
store's ETag), hashed into data/source.json, which `shard` depends on. A changed corpus
changes the file and makes `shard` stale; an unchanged one leaves it byte for byte as it was,
and nothing reruns. `pipe:` inputs cannot be looked into: only their commands are listed.
`--print` writes the current fingerprint to stdout instead (what `vqpipe status` compares).
"""

from __future__ import annotations

import hashlib
import json
import sys

from components.config import ShardConfig, load_params
from components.data.sources import open_source
from components.io import write_json
from pipelines.runtime import Paths, stage_main


def fingerprint(cfg: ShardConfig) -> dict:
    """{source, inputs, bytes, missing, digest}: the same for the same listing, and nothing in it
    depends on when or where it was made."""
    source = open_source(cfg, check=False)
    digest = hashlib.sha256()
    inputs = size = missing = 0
    for name, nbytes, version in source.listing():
        digest.update(f"{name}\t{nbytes}\t{version}\n".encode())
        inputs += 1
        size += max(nbytes, 0)
        missing += nbytes < 0
    return {
        "source": source.description,
        "inputs": inputs,
        "bytes": size,
        "missing": missing,
        "digest": digest.hexdigest(),
    }


def describe_change(old: dict, new: dict) -> str:
    """What differs between two fingerprints, in words."""
    if old.get("source") != new["source"]:
        return f"source {old.get('source')} -> {new['source']}"
    parts = [f"{k} {old.get(k)} -> {new[k]}" for k in ("inputs", "bytes", "missing") if old.get(k) != new[k]]
    return ", ".join(parts) or "sizes or modification times of its inputs changed"


def run(cfg: ShardConfig, paths: Paths = Paths()) -> dict:
    result = fingerprint(cfg)
    write_json(paths.source_fingerprint, result)
    print(f"{result['source']}: {result['inputs']} inputs, {result['bytes']} bytes -> {paths.source_fingerprint}")
    return result


def main() -> None:
    if "--print" in sys.argv[1:]:
        print(json.dumps(fingerprint(load_params("params.yaml").shard)))
        return
    stage_main("shard", run)


if __name__ == "__main__":
    main()
