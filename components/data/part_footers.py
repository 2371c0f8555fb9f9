"""What token parts' footers tell without reading their tokens: what the parts are (to tie a
checkpoint to them) and their largest label; and the digest of every token that vqpipe <= 0.2
tied prior checkpoints to, computed a record batch at a time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq

from components.data.tokens import PartInfo, sequences


def parts_identity(paths: list, infos: list[PartInfo]) -> str:
    """A sha256 of what the parts are (name, size, rows, row groups, tokenizer, source), from
    their footers as `check_parts` read them (`infos`): equal for the same parts, without
    reading a token."""
    digest = hashlib.sha256()
    for path, info in zip(paths, infos, strict=True):
        size = fsspec.core.url_to_fs(str(path))[0].size(str(path))
        fields = [Path(str(path)).name, size, info.rows, info.row_groups, info.fingerprint, info.source]
        digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()


def largest_label(paths: list) -> int:
    """The largest `label` of the parts (-1: none), from the row groups' statistics where they
    have them, else reading that column alone."""
    largest = -1
    for path in paths:
        parquet = pq.ParquetFile(path)
        if "label" not in parquet.schema_arrow.names:
            continue
        column = parquet.schema_arrow.get_field_index("label")
        for i in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(i).column(column).statistics
            if stats is not None and stats.has_min_max:
                largest = max(largest, int(stats.max))
            else:
                values = parquet.read_row_group(i, columns=["label"]).column(0).to_numpy(zero_copy_only=False)
                largest = max(largest, int(values.max(initial=-1)))
    return largest


def legacy_tokens_digest(paths: list, tiers: list) -> str:
    """The sha256 vqpipe <= 0.2 tied a prior's checkpoint to: of every row's int64 tokens, in
    part order, computed a record batch at a time."""
    digest = hashlib.sha256()
    for path in paths:
        for record in pq.ParquetFile(path).iter_batches(batch_size=4096):
            digest.update(np.ascontiguousarray(sequences(record, tiers)).tobytes())
    return digest.hexdigest()
