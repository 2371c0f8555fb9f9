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


def part_name(shard_url: str) -> str:
    """`.../train-000003.tar` -> `part-train-000003.parquet`: the same input always maps to the same part."""
    stem = Path(shard_url).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        stem = stem.removesuffix(suffix)
    return f"part-{stem}.parquet"


def tokenize_shard(tokenizer, shard_url: str, out_dir: str | Path, batch_size: int = 256) -> ShardTokens:
    """Encode every image of a shard; rows written + samples rejected = samples read."""
    keys: list[str] = []
    labels: list[int] = []
    tokens: list[np.ndarray] = []
    rejects: list[dict] = []
    batch: list[np.ndarray] = []
    samples = 0

    def flush() -> None:
        if batch:
            x = torch.from_numpy(np.stack(batch)).float().div_(255.0)
            # (b, h, w[, m]) -> (b, h*w, m): one (h*w)-long row per token column.
            indices = tokenizer.encode(x).cpu().reshape(len(batch), -1, tokenizer.tokens_per_position)
            tokens.append(indices.numpy())
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
        if len(batch) >= batch_size:
            flush()
    flush()

    h, w = tokenizer.grid
    stacked = np.concatenate(tokens) if tokens else np.zeros((0, h * w, tokenizer.tokens_per_position), dtype=np.int64)
    columns = {name: stacked[:, :, i] for i, name in enumerate(tokenizer.token_columns)}
    label_array = np.asarray(labels, dtype=np.int32) if any(lbl >= 0 for lbl in labels) else None
    table = token_table(
        keys, columns, label_array,
        fingerprint=tokenizer.fingerprint, codebook_size=tokenizer.codebook_size, grid=tokenizer.grid,
    )
    name = part_name(shard_url)
    write_part(table, Path(out_dir) / name)
    return ShardTokens(input_shard=shard_url, part=name, samples=samples, rows=len(keys), rejects=rejects)
