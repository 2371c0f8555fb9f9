"""One shard of images -> one Parquet token part, with the training-time preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from components.data.images import DECODE_ERRORS, decode_image, describe_error, to_array
from components.data.shards import iter_shard, sample_image_bytes, sample_label
from components.data.tokens import token_table, write_part


@dataclass
class ShardTokens:
    input_shard: str
    part: str
    samples: int  # read from the shard
    rows: int  # written to the part
    rejects: list[dict] = field(default_factory=list)  # {"key", "reason"}


def _text(field: bytes | str | None) -> str | None:
    """A sample's text field (`txt`, `json`) as a string; undecodable bytes are replaced."""
    if field is None:
        return None
    return field.decode("utf-8", errors="replace") if isinstance(field, bytes) else str(field)


def part_name(shard_url: str) -> str:
    """`.../train-000003.tar` -> `part-train-000003.parquet`: the same input always maps to the same part."""
    stem = Path(shard_url).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        stem = stem.removesuffix(suffix)
    return f"part-{stem}.parquet"


def tokenize_shard(tokenizer, shard_url: str, out_dir: str | Path, batch_size: int = 256) -> ShardTokens:
    """Encode every image of a shard; rows written + samples rejected = samples read. A sample's
    `txt` and `json` travel with its tokens (`caption`, `meta` columns)."""
    keys: list[str] = []
    labels: list[int] = []
    captions: list[str | None] = []
    meta: list[str | None] = []
    tokens: dict[str, list[np.ndarray]] = {name: [] for name in tokenizer.token_columns}
    rejects: list[dict] = []
    batch: list[np.ndarray] = []
    samples = 0

    def flush() -> None:
        if batch:
            x = torch.from_numpy(np.stack(batch)).float().div_(255.0)
            for name, column in tokenizer.encode_columns(x).items():
                tokens[name].append(column.cpu().numpy())
            batch.clear()

    for sample in iter_shard(shard_url):
        samples += 1
        key = sample["__key__"]
        data = sample_image_bytes(sample)
        if data is None:
            rejects.append({"key": key, "reason": "no image field"})
            continue
        try:
            batch.append(to_array(decode_image(data, tokenizer.image_size)))
        except DECODE_ERRORS as err:
            rejects.append({"key": key, "reason": describe_error(err)})
            continue
        keys.append(key)
        labels.append(sample_label(sample))
        captions.append(_text(sample.get("txt")))
        meta.append(_text(sample.get("json")))
        if len(batch) >= batch_size:
            flush()
    flush()

    grids = tokenizer.column_grids
    columns = {
        name: np.concatenate(chunks) if chunks else np.zeros((0, grids[name][0] * grids[name][1]), dtype=np.int64)
        for name, chunks in tokens.items()
    }
    label_array = np.asarray(labels, dtype=np.int32) if any(lbl >= 0 for lbl in labels) else None
    table = token_table(
        keys, columns, label_array,
        fingerprint=tokenizer.fingerprint, codebook_size=tokenizer.codebook_size, grid=grids,
        levels=[tokenizer.level_columns(level) for level in tokenizer.levels],
        captions=captions, meta=meta,
    )
    name = part_name(shard_url)
    write_part(table, Path(out_dir) / name)
    return ShardTokens(input_shard=shard_url, part=name, samples=samples, rows=len(keys), rejects=rejects)
