"""Stage `weights_fingerprint`: the content of the weights files params.yaml names.

    dvc repro weights_fingerprint      # or: python -m pipelines.weights_fingerprint [--print]

`train_tokenizer.perceptual_weights`, `evaluate.inception_weights` and `evaluate.perceptual_weights`
name local files by path, and a path may be null, so dvc.yaml cannot list them as deps. This
stage runs every time (`always_changed`) and writes the sha256 of each named file into
data/weights/{train_tokenizer,evaluate}.json, which those stages depend on: a file replaced by
another of different content makes its stage stale; an unchanged one leaves the JSON byte for
byte as it was. Hashes are reused while a file's size, inode and modification time stay the
same (a cache in .dvc/tmp, not tracked), so a run does not reread gigabytes of unchanged weights.
`--print` writes the current record to stdout instead (what `vqpipe status` compares).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from components.config import ConfigError, Params, load_params
from components.data.shards import sha256_file
from components.io import write_json
from pipelines.runtime import Paths, stage_main

WEIGHTS = {  # the stage that reads them -> the params naming weights files (or, for export, a text tokenizer)
    "train_tokenizer": ("perceptual_weights",),
    "export": ("text_tokenizer",),
    "evaluate": ("inception_weights", "perceptual_weights"),
}
CACHE = Path(".dvc") / "tmp" / "vqpipe-weights-hashes.json"


def _sha256(path: Path, cache: dict) -> str:
    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_ino, st.st_mtime_ns]
    if cache.get(key, {}).get("stamp") != stamp:
        cache[key] = {"stamp": stamp, "sha256": sha256_file(path)}
    return cache[key]["sha256"]


def fingerprint(params: Params, root: Path) -> dict[str, dict]:
    """{stage: {key: {"path", "sha256", "bytes"} or None}}; a missing file is a ConfigError
    naming its key (params validation reports it first in `vqpipe run`)."""
    cache_path = root / CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    record: dict[str, dict] = {}
    for stage, keys in WEIGHTS.items():
        record[stage] = {}
        for key in keys:
            given = getattr(getattr(params, stage), key)
            if given is None:
                record[stage][key] = None
                continue
            path = Path(given) if Path(given).is_absolute() else root / given
            if not path.is_file():
                raise ConfigError([(f"{stage}.{key}", f"{given} is not a file")], str(root / "params.yaml"))
            record[stage][key] = {"path": given, "sha256": _sha256(path, cache), "bytes": path.stat().st_size}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, cache_path)
    return record


def recorded(paths: Paths) -> dict[str, dict] | None:
    """What the last run wrote (None when a file is missing)."""
    try:
        return {stage: json.loads((paths.weights / f"{stage}.json").read_text()) for stage in WEIGHTS}
    except (OSError, ValueError):
        return None


def describe_change(old: dict | None, new: dict) -> dict[str, str]:
    """{stage: what changed in words} for the stages whose weights differ."""
    if old is None:
        return {stage: "never fingerprinted" for stage in new}
    changes = {}
    for stage, keys in new.items():
        words = []
        for key, now in keys.items():
            before = old.get(stage, {}).get(key)
            if before == now:
                continue
            if before is None or now is None or before.get("path") != now.get("path"):
                words.append(f"{key} {before and before['path']} -> {now and now['path']}")
            else:
                words.append(f"{key}: {now['path']} has other content")
        if words:
            changes[stage] = ", ".join(words)
    return changes


def run(params: Params, paths: Paths) -> dict:
    record = fingerprint(params, paths.root)
    for stage, keys in record.items():
        write_json(paths.weights / f"{stage}.json", keys)
        named = [f"{k} {v['path']} ({v['sha256'][:12]})" for k, v in keys.items() if v]
        print(f"{stage}: {', '.join(named) or 'no weights files'}")
    return record


def main() -> None:
    if "--print" in sys.argv[1:]:
        print(json.dumps(fingerprint(load_params("params.yaml"), Path("."))))
        return
    stage_main(None, lambda params: run(params, Paths()))


if __name__ == "__main__":
    main()
