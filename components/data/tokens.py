"""Token shards: Parquet (zstd) parts with the tokenizer's identity in the schema metadata.

Columns: `key` string; the token columns, each list<uint16> (list<uint32> past 65,536 codes) of
one image's h*w tokens in raster order: `tokens` for a quantizer with one token per position,
one column per group or stage for product and residual quantizers (`tokens_group0`,
`tokens_group1`, ... / `tokens_stage0` (coarsest), `tokens_stage1`, ...), one per tier for a
hierarchical tokenizer (`tokens_top`, `tokens_bottom`; `tokens_top_group0`, ... when a tier has
several tokens per position); `label` int32 when labelled; `caption` string (the sample's `txt`)
and `meta` string (its `json`) when the samples have them; `cls` string for shards whose `cls`
fields are not integer class ids. Schema metadata:
`vqpipe.tokenizer_fingerprint`, `vqpipe.codebook_size` (the largest tier's),
`vqpipe.codebook_sizes` (JSON: token column -> its codebook's size; parts before vqpipe 0.10 lack
it, and every column reads as `vqpipe.codebook_size`), `vqpipe.grid`
(JSON: token column -> [h, w], in column order), `vqpipe.tiers` (JSON: the columns of each
tier, coarsest first; `vqpipe.levels` in parts of vqpipe 0.1, still read), `vqpipe.version`, and
`vqpipe.source` (JSON: the input shard, samples
read from it, rejected samples with reasons). Parts are written under a temporary name and renamed
when complete, so a part that exists is whole. `_manifest.json` lists the parts.

Read without a Python loop per row:

    data = read_tokens(parts, fingerprint=tokenizer.fingerprint)
    data.tokens  # (n, h*w*m) int64: the sequence a prior models

or stream a corpus larger than memory, for a language model's sequences:

    for batch in iter_token_batches(parts, 1024, vocab_offset=32000, boi=48384, eoi=48385):
        batch.tokens  # (b, 2 + L) int64: [boi, codes + 32000 ..., eoi]

Flattening order of several token columns (the order of `Tokenizer.flatten`): tier by tier,
coarsest first; within a tier position by position in raster order, and within a position its
m tokens in column order, so [p0 group0, p0 group1, p1 group0, p1 group1, ...], or
[top p0, top p1, ..., bottom p0, bottom p1, ...].
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components import __version__
from components.io import atomic_write_to, is_url

MANIFEST = "_manifest.json"
META_FINGERPRINT = b"vqpipe.tokenizer_fingerprint"
META_CODEBOOK = b"vqpipe.codebook_size"
META_CODEBOOK_SIZES = b"vqpipe.codebook_sizes"
META_GRID = b"vqpipe.grid"
META_TIERS = b"vqpipe.tiers"
META_LEGACY_TIERS = b"vqpipe.levels"  # what vqpipe 0.1 called it
META_VERSION = b"vqpipe.version"
META_SOURCE = b"vqpipe.source"


class TokenShardMismatch(ValueError):
    """Token shards made by another tokenizer than the one in hand."""


def token_type(codebook_size: int) -> pa.DataType:
    return pa.uint16() if codebook_size <= 65536 else pa.uint32()


def tokens_array(tokens: np.ndarray, codebook_size: int) -> pa.ListArray:
    """(n, L) integer array -> list<uint16|uint32> column, built without a per-row loop."""
    n, length = tokens.shape
    dtype = token_type(codebook_size)
    values = pa.array(tokens.reshape(-1).astype(dtype.to_pandas_dtype(), copy=False), type=dtype)
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


@dataclass(frozen=True)
class PartLayout:
    """What a part says about its tokens, the same for every part of one tokenizer:
    `fingerprint`, `codebook_size`, `grid` (every column's (h, w), or one per column),
    `tiers` (the columns of each tier, coarsest first; default: one tier) and
    `codebook_sizes` (per column; default: `codebook_size` for every one)."""

    fingerprint: str
    codebook_size: int
    grid: tuple[int, int] | dict[str, tuple[int, int]]
    tiers: list[list[str]] | None = None
    codebook_sizes: dict[str, int] | None = None


@dataclass
class PartRows:
    """The rows of a part. tokens: column name -> (n, h*w) array, in column order. captions /
    meta: per row, the sample's `txt` and `json` (JSON text), null where it had none; a column
    is written only when some row has a value. classes: the samples' `cls` text, for a shard
    whose classes are not integer ids (those go in `labels`)."""

    keys: list[str]
    tokens: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    captions: list[str | None] | None = None
    meta: list[str | None] | None = None
    classes: list[str | None] | None = None


TEXT_COLUMNS = ("caption", "meta", "cls")


def token_table(
    rows: PartRows, layout: PartLayout, source: dict | None = None, text_columns: tuple[str, ...] | None = None
) -> pa.Table:
    """The Arrow table of a part. source: where the rows came from (`input_shard`, `samples`
    read, `rejects`), kept in the metadata so a part describes itself. text_columns: which of
    `caption`, `meta`, `cls` to write (default: those with a value in some row); a part
    written a row group at a time names them, so every row group has the same schema."""
    tokens = rows.tokens
    grids = layout.grid if isinstance(layout.grid, dict) else {name: layout.grid for name in tokens}
    tiers = layout.tiers or [list(tokens)]
    if [c for tier in tiers for c in tier] != list(tokens) or list(grids) != list(tokens):
        raise ValueError(f"tiers {tiers} and grids {list(grids)} must list the token columns {list(tokens)} in order")
    columns = {"key": pa.array(rows.keys, type=pa.string())}
    for name, matrix in tokens.items():
        columns[name] = tokens_array(matrix, layout.codebook_size)
    if rows.labels is not None:
        columns["label"] = pa.array(np.asarray(rows.labels, dtype=np.int32), type=pa.int32())
    for name, values in zip(TEXT_COLUMNS, (rows.captions, rows.meta, rows.classes), strict=True):
        wanted = name in text_columns if text_columns is not None else values and any(v is not None for v in values)
        if wanted:
            columns[name] = pa.array(values if values is not None else [None] * len(rows.keys), type=pa.string())
    metadata = {
        META_FINGERPRINT: layout.fingerprint.encode(),
        META_CODEBOOK: str(layout.codebook_size).encode(),
        META_CODEBOOK_SIZES: json.dumps(
            {name: (layout.codebook_sizes or {}).get(name, layout.codebook_size) for name in tokens}
        ).encode(),
        META_GRID: json.dumps({name: list(grids[name]) for name in tokens}).encode(),
        META_TIERS: json.dumps(tiers).encode(),
        META_VERSION: __version__.encode(),
    }
    if source is not None:
        metadata[META_SOURCE] = json.dumps(source, sort_keys=True).encode()
    return pa.table(columns).replace_schema_metadata(metadata)


def write_part(table: pa.Table, path: str | Path) -> None:
    """Write atomically (temporary name, renamed when complete) to a local path or any fsspec URL."""
    atomic_write_to(path, lambda f: pq.write_table(table, f, compression="zstd"))


def write_part_groups(tables: Iterator[pa.Table], path: str | Path) -> None:
    """A part from tables of one schema, each a row group, written as they come (memory holds
    one); atomically, like `write_part`. There must be at least one table (it may be empty)."""

    def write(f) -> None:
        writer = None
        try:
            for table in tables:
                if writer is None:
                    writer = pq.ParquetWriter(f, table.schema, compression="zstd")
                writer.write_table(table)
            if writer is None:
                raise ValueError(f"no rows, not even an empty table, for {path}")
        finally:
            if writer is not None:
                writer.close()

    atomic_write_to(path, write)


@dataclass
class PartInfo:
    fingerprint: str
    codebook_size: int
    grid: dict  # token column -> [h, w], in column order
    rows: int
    tiers: list  # the token columns of each tier, coarsest first
    source: dict | None = None  # input_shard, samples, rejects (None for parts without it)
    row_groups: int = 1
    column_sizes: dict | None = None  # token column -> codebook size (None: parts before 0.10)

    @property
    def token_columns(self) -> list[str]:
        return list(self.grid)

    @property
    def codebook_sizes(self) -> dict[str, int]:
        """Every token column's codebook size (`codebook_size` for each, in parts before 0.10)."""
        return self.column_sizes or {name: self.codebook_size for name in self.grid}


def part_info(path: str | Path, filesystem=None) -> PartInfo:
    meta = pq.read_metadata(path, filesystem=filesystem)
    schema_meta = meta.schema.to_arrow_schema().metadata or {}
    if META_FINGERPRINT not in schema_meta:
        raise TokenShardMismatch(f"{path} is not a vqpipe token shard (no {META_FINGERPRINT.decode()} metadata)")
    return PartInfo(
        fingerprint=schema_meta[META_FINGERPRINT].decode(),
        codebook_size=int(schema_meta[META_CODEBOOK]),
        grid=json.loads(schema_meta[META_GRID]),
        rows=meta.num_rows,
        tiers=_tiers(schema_meta),
        source=json.loads(schema_meta[META_SOURCE]) if META_SOURCE in schema_meta else None,
        row_groups=meta.num_row_groups,
        column_sizes=json.loads(schema_meta[META_CODEBOOK_SIZES]) if META_CODEBOOK_SIZES in schema_meta else None,
    )


def _tiers(schema_meta: dict) -> list[list[str]]:
    for key in (META_TIERS, META_LEGACY_TIERS):
        if key in schema_meta:
            return json.loads(schema_meta[key])
    return [list(json.loads(schema_meta[META_GRID]))]  # parts written before hierarchical tokenizers


@dataclass
class TokenData:
    keys: list[str]
    tokens: np.ndarray  # (n, L) int64, flattened tier by tier, position by position (see the module doc)
    labels: np.ndarray | None  # (n,) int64, -1 where unlabelled; None when no part has labels
    codebook_size: int
    grid: dict
    columns: list[str]
    tiers: list

    def column(self, name: str) -> np.ndarray:
        """(n, h*w) tokens of one token column: a strided view into `tokens`."""
        return column_of(self.tokens, name, self.tiers, self.grid)


def column_of(tokens: np.ndarray, name: str, tiers: list, grid: dict) -> np.ndarray:
    """(n, h*w) tokens of column `name` from flattened rows (n, L) (see the module doc): a view."""
    start = 0
    for tier in tiers:
        h, w = grid[tier[0]]
        width = h * w * len(tier)
        if name in tier:
            block = tokens[:, start : start + width].reshape(len(tokens), h * w, len(tier))
            return block[:, :, tier.index(name)]
        start += width
    raise KeyError(f"no token column {name!r} (columns: {', '.join(grid)})")


def list_to_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<uint> column of equal-length rows -> (n, L) int64, without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.int64)
    lengths = np.diff(arr.offsets.to_numpy())
    if (lengths != lengths[0]).any():
        raise ValueError("token rows have different lengths")
    return arr.flatten().to_numpy().astype(np.int64).reshape(n, int(lengths[0]))


def check_parts(paths: list, fingerprint: str | None) -> list[PartInfo]:
    """Part infos, all from the tokenizer `fingerprint` (the first part's when None) and with
    one token layout; raises TokenShardMismatch naming the first part that differs."""
    if not paths:
        raise ValueError("no token parts to read")
    infos = [part_info(p) for p in paths]
    expected = fingerprint or infos[0].fingerprint
    for path, info in zip(paths, infos, strict=True):
        if info.fingerprint != expected:
            raise TokenShardMismatch(
                f"{path} was made by tokenizer {info.fingerprint[:12]}, not {expected[:12]}: "
                "re-tokenize (dvc repro tokenize) or use the matching tokenizer"
            )
        if info.token_columns != infos[0].token_columns or info.grid != infos[0].grid or info.tiers != infos[0].tiers:
            raise TokenShardMismatch(f"{path} has token columns {info.grid}, {paths[0]} has {infos[0].grid}")
    return infos


def sequences(table: pa.Table | pa.RecordBatch, tiers: list) -> np.ndarray:
    """(n, L) int64 in the documented order: per tier (n, h*w, m) -> (n, h*w*m), a position's m
    tokens side by side; then the tiers one after the other, coarsest first."""
    n = table.num_rows
    blocks = [np.stack([list_to_matrix(table.column(name)) for name in tier], axis=-1).reshape(n, -1) for tier in tiers]
    return np.concatenate(blocks, axis=1)


def row_labels(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    if "label" in table.column_names:
        return table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return np.full(table.num_rows, -1, dtype=np.int64)


def read_tokens(paths: list[str | Path], fingerprint: str | None = None) -> TokenData:
    """Read token parts into memory; refuses parts whose fingerprint differs from `fingerprint`
    (when given). For corpora larger than memory, stream them with `iter_token_batches`."""
    infos = check_parts(paths, fingerprint)
    tiers = infos[0].tiers
    tables = [pq.read_table(p) for p in paths]
    has_labels = any("label" in t.column_names for t in tables)
    return TokenData(
        keys=[key for t in tables for key in t.column("key").to_pylist()],
        tokens=np.concatenate([sequences(t, tiers) for t in tables]),
        labels=np.concatenate([row_labels(t) for t in tables]) if has_labels else None,
        codebook_size=infos[0].codebook_size,
        grid=infos[0].grid,
        columns=infos[0].token_columns,
        tiers=tiers,
    )


@dataclass
class TokenBatch:
    keys: list[str]
    tokens: np.ndarray  # (b, L) int64: [boi] + the image's tokens + vocab_offset + [eoi]
    labels: np.ndarray  # (b,) int64, -1 where unlabelled
    captions: list[str | None] | None = None  # with `captions=True` (None where a row has none)

    def rows(self, start: int, stop: int) -> TokenBatch:
        captions = self.captions[start:stop] if self.captions is not None else None
        return TokenBatch(self.keys[start:stop], self.tokens[start:stop], self.labels[start:stop], captions)

    def concat(self, other: TokenBatch) -> TokenBatch:
        captions = self.captions + other.captions if self.captions is not None else None
        return TokenBatch(
            self.keys + other.keys,
            np.concatenate([self.tokens, other.tokens]),
            np.concatenate([self.labels, other.labels]),
            captions,
        )


def iter_token_batches(
    paths: list[str | Path],
    batch_size: int,
    *,
    fingerprint: str | None = None,
    vocab_offset: int = 0,
    boi: int | None = None,
    eoi: int | None = None,
    captions: bool = False,
) -> Iterator[TokenBatch]:
    """Stream token parts as numpy batches of `batch_size` rows (the last may be smaller), one
    Parquet record batch at a time: memory stays bounded however large the corpus.

    For packing images into a language model's sequences: every token is shifted by
    `vocab_offset` (image codes after the text vocabulary), and `boi` / `eoi` (begin/end of
    image ids, outside the shifted code range) are put before / after each image's tokens.
    Sequences are in `read_tokens`' order (tier by tier, position by position). With
    `captions`, each batch carries its rows' captions too (None where a part has none)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if vocab_offset < 0:
        raise ValueError(f"vocab_offset must be >= 0, got {vocab_offset}")
    infos = check_parts(paths, fingerprint)
    tiers, size = infos[0].tiers, infos[0].codebook_size
    for name, token in (("boi", boi), ("eoi", eoi)):
        if token is not None and (token < 0 or vocab_offset <= token < vocab_offset + size):
            raise ValueError(
                f"{name}={token} must be >= 0 and outside the image codes [{vocab_offset}, {vocab_offset + size})"
            )
    columns = ["key", *(c for tier in tiers for c in tier)]
    held: TokenBatch | None = None  # fewer than batch_size rows, carried into the next record batch
    for path in paths:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        wanted = columns + [c for c in ("label", "caption") if c in names and (c == "label" or captions)]
        for record in parquet.iter_batches(batch_size=batch_size, columns=wanted):
            n = record.num_rows
            pieces = [np.full((n, 1), boi, dtype=np.int64)] if boi is not None else []
            pieces.append(sequences(record, tiers) + vocab_offset)
            if eoi is not None:
                pieces.append(np.full((n, 1), eoi, dtype=np.int64))
            texts = None
            if captions:
                texts = record.column("caption").to_pylist() if "caption" in names else [None] * n
            chunk = TokenBatch(
                record.column("key").to_pylist(), np.concatenate(pieces, axis=1), row_labels(record), texts
            )
            held = chunk if held is None else held.concat(chunk)
            while len(held.keys) >= batch_size:
                yield held.rows(0, batch_size)
                held = held.rows(batch_size, len(held.keys))
    if held is not None and held.keys:
        yield held


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    """`_manifest.json` in `out_dir` (a local path or any fsspec URL), replaced atomically."""
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_to(f"{str(out_dir).rstrip('/')}/{MANIFEST}", lambda f: f.write(data))


def read_manifest(token_dir: str | Path) -> dict:
    if is_url(token_dir):
        with fsspec.open(f"{str(token_dir).rstrip('/')}/{MANIFEST}", "r") as f:
            return json.load(f)
    path = Path(str(token_dir).removeprefix("file://")) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the tokenize stage first (dvc repro tokenize)")
    return json.loads(path.read_text())


def split_parts(token_dir: str | Path, split: str) -> list[Path]:
    """Token parts of one split, from the manifest."""
    manifest = read_manifest(token_dir)
    return [Path(token_dir) / p["part"] for p in manifest["parts"] if p["split"] == split and p["rows"] > 0]
