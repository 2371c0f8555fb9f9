"""One input shard of images -> one Parquet token part, with the training-time preprocessing.

The work of `vqpipe tokenize` and of the pipeline's `tokenize` stage, wherever it runs (in
this process or in a Ray actor): the shard is streamed, images are decoded and resized on a
pool of threads while the model encodes the previous batch, and the part is written under a
temporary name and renamed when complete. The part describes itself in its schema metadata
(input shard, samples read, rejects with reasons, tokenizer fingerprint), so a rerun can tell a
complete part of the same tokenizer from anything else without any other record.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components.data.corpus import REJECT, read_shard
from components.data.images import DECODE_ERRORS, decode_image, describe_error, to_array
from components.data.limits import DEFAULT_LIMITS, ReadLimits
from components.data.shards import sample_image_bytes
from components.data.tokens import TEXT_COLUMNS, PartLayout, PartRows, list_to_matrix, token_table, write_part_groups

ROW_GROUP_ROWS = 1024  # rows of a part's row group: what tokenizing holds, and what readers read at once


@dataclass
class ShardTokens:
    input_shard: str  # the input as the user named it (what the manifest records)
    part: str  # the part's file name
    samples: int  # read from the shard
    rows: int  # written to the part
    rejects: list[dict] = field(default_factory=list)  # {"key", "reason"}, in shard order

    def manifest_entry(self) -> dict:
        return {
            "input_shard": self.input_shard,
            "part": self.part,
            "samples": self.samples,
            "rows": self.rows,
            "rejected": len(self.rejects),
            "rejects": self.rejects,
        }


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _path_of(url: str) -> list[str]:
    """The path components naming a shard: of the URL, or of the file a `pipe:` command reads."""
    if url.startswith("pipe:"):
        words = url[len("pipe:") :].split()
        named = [w for w in words if ".tar" in w or ".tgz" in w] or words or ["pipe"]
        url = named[-1]
    path = url.split("://", 1)[-1].split("?", 1)[0]
    return [p for p in PurePosixPath(path).parts if p not in ("/", "")] or ["shard"]


def _stem(name: str) -> str:
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def part_names(inputs: list[str]) -> dict[str, str]:
    """Input shard -> part file name, the same for the same input in any run.

    `.../train-000003.tar` -> `part-train-000003.parquet`. Where two inputs share a file name
    (`a/00000.tar`, `b/00000.tar`), the parent directories are added until the names differ
    (`part-a_00000.parquet`, `part-b_00000.parquet`)."""
    paths = {url: _path_of(url) for url in inputs}

    def name(url: str, depth: int) -> str:
        parts = paths[url][-depth:]
        return "part-" + _UNSAFE.sub("_", "_".join([*parts[:-1], _stem(parts[-1])])) + ".parquet"

    names: dict[str, str] = {}
    pending = list(dict.fromkeys(inputs))
    depth = 1
    while pending:
        candidates = {url: name(url, depth) for url in pending}
        counts: dict[str, int] = {}
        for n in candidates.values():
            counts[n] = counts.get(n, 0) + 1
        deepest = all(depth >= len(paths[url]) for url in pending)
        for url, n in candidates.items():
            if counts[n] == 1 or deepest:
                names[url] = n
        pending = [url for url in pending if url not in names]
        depth += 1
    # Inputs whose names still collide (one path under two schemes, names that differ only in
    # characters a file name cannot hold) are told apart by a hash of the whole input: stable
    # whatever the other inputs, and never equal to another input's name.
    counts = Counter(names.values())
    return {
        url: n
        if counts[n] == 1
        else n.removesuffix(".parquet") + f"-{hashlib.sha1(url.encode()).hexdigest()[:10]}.parquet"
        for url, n in names.items()
    }


def _text(value: bytes | str | None) -> str | None:
    """A sample's text field (`txt`, `json`, `cls`) as a string; undecodable bytes are replaced."""
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _label(cls: str | None) -> int | None:
    """An integer class id from `cls`, None when absent or not an int32 integer."""
    if cls is None:
        return None
    try:
        value = int(cls.strip())
    except ValueError:
        return None
    return value if -(2**31) <= value < 2**31 else None  # the `label` column is int32


def _decode(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    return to_array(decode_image(data, size, max_pixels))


@dataclass(frozen=True)
class ShardTask:
    """One input shard to tokenize: read from `url`, written as `out/part`. `input_name` is
    what the part records as its input (default: `url`)."""

    url: str
    out: str
    part: str
    input_name: str | None = None
    limits: ReadLimits = DEFAULT_LIMITS

    @property
    def name(self) -> str:
        return self.input_name or self.url


class _Decoded(NamedTuple):
    """A sample of the shard, in shard order: its text fields (`__key__`, `txt`, `json`,
    `cls`) and its decoded image, or why it has none."""

    fields: dict
    image: np.ndarray | None
    reject: str | None


def decoded_samples(
    url: str, size: int, threads: int, window: int, limits: ReadLimits = DEFAULT_LIMITS
) -> Iterator[_Decoded]:
    """The shard's samples in order, their images decoded and resized to `size` on `threads`
    threads, at most `window` of them in flight; what `read_shard` could not make a sample of
    comes as a reject. Raises ShardUnreadable when the shard cannot be read whole."""
    pending: deque[tuple[dict, Future | str | None]] = deque()  # a reason: rejected unread

    def ready(limit: int) -> Iterator[_Decoded]:
        while len(pending) > limit:
            fields, future = pending.popleft()
            if future is None or isinstance(future, str):
                yield _Decoded(fields, None, future or "no image field")
                continue
            try:
                yield _Decoded(fields, future.result(), None)
            except DECODE_ERRORS as err:
                yield _Decoded(fields, None, describe_error(err))

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
        try:
            for sample in read_shard(url, limits):
                fields = {k: sample.get(k) for k in ("__key__", "txt", "json", "cls")}
                if REJECT in sample:
                    pending.append((fields, sample[REJECT]))
                    yield from ready(window)
                    continue
                data = sample_image_bytes(sample)
                future = None if data is None else pool.submit(_decode, data, size, limits.max_image_pixels)
                pending.append((fields, future))
                yield from ready(window)
            yield from ready(0)
        finally:
            for _, future in pending:
                if isinstance(future, Future):
                    future.cancel()


class _PartBuilder:
    """The rows of one part as they come: text fields per row, token columns per encoded
    batch, spooled to a local Parquet file a row group (`ROW_GROUP_ROWS` rows) at a time, so
    memory holds a row group whatever the shard's size. `tables()` gives the part's row groups
    once the shard is read: only then is it known which text columns the part has and whether
    `cls` is an integer label."""

    def __init__(self, tokenizer, batch_size: int, model_lock, spool: str):
        self.tokenizer, self.batch_size, self.model_lock = tokenizer, batch_size, model_lock
        tok = self.tokenizer
        tiers = [tok.tier_columns(tier) for tier in tok.tiers]
        self.layout = PartLayout(tok.fingerprint, tok.codebook_size, tok.column_grids, tiers, tok.column_codebook_sizes)
        self.spool_path = spool
        self.spool: pq.ParquetWriter | None = None
        self.rows = 0
        self.present = {name: False for name in TEXT_COLUMNS}
        self.numeric = True  # every `cls` seen is an integer class id
        self._clear()
        self.batch: list[np.ndarray] = []

    def _clear(self) -> None:
        self.keys: list[str] = []
        self.text: dict[str, list[str | None]] = {name: [] for name in TEXT_COLUMNS}
        self.tokens: dict[str, list[np.ndarray]] = {name: [] for name in self.tokenizer.token_columns}

    def add(self, fields: dict, image: np.ndarray) -> None:
        self.keys.append(fields["__key__"])
        for name, field_name in zip(TEXT_COLUMNS, ("txt", "json", "cls"), strict=True):
            value = _text(fields.get(field_name))
            self.text[name].append(value)
            self.present[name] |= value is not None
        cls = self.text["cls"][-1]
        self.numeric &= cls is None or _label(cls) is not None
        self.batch.append(image)
        if len(self.batch) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Encode the images waiting, one forward pass under the actor's model lock; spool a row
        group once there are enough rows."""
        if self.batch:
            x = torch.from_numpy(np.stack(self.batch)).float().div_(255.0)
            with self.model_lock or contextlib.nullcontext(), torch.inference_mode():
                for name, column in self.tokenizer.encode_columns(x).items():
                    self.tokens[name].append(column.cpu().numpy())
            self.batch.clear()
        if len(self.keys) >= ROW_GROUP_ROWS:
            self._spill()

    def _spill(self) -> None:
        if not self.keys:
            return
        columns = {name: np.concatenate(chunks) for name, chunks in self.tokens.items()}
        rows = PartRows(self.keys, columns, None, self.text["caption"], self.text["meta"], self.text["cls"])
        table = token_table(rows, self.layout, text_columns=TEXT_COLUMNS)
        if self.spool is None:
            self.spool = pq.ParquetWriter(self.spool_path, table.schema, compression="none")
        self.spool.write_table(table)
        self.rows += len(self.keys)
        self._clear()

    def tables(self, source: dict) -> Iterator[pa.Table]:
        """The part's row groups, with its final columns and `source` in the metadata."""
        self.flush()
        self._spill()
        if self.spool is not None:
            self.spool.close()
        numeric = self.numeric and self.present["cls"]
        kept = tuple(n for n in ("caption", "meta") if self.present[n])
        if self.present["cls"] and not numeric:
            kept += ("cls",)
        if not self.rows:
            grids = self.tokenizer.column_grids
            empty = {n: np.zeros((0, grids[n][0] * grids[n][1]), dtype=np.int64) for n in grids}
            yield token_table(PartRows([], empty), self.layout, source, kept)
            return
        spooled = pq.ParquetFile(self.spool_path)
        for i in range(spooled.num_row_groups):
            group = spooled.read_row_group(i)
            classes = group.column("cls").to_pylist()
            labels = None
            if numeric:
                labels = np.asarray([-1 if c is None else _label(c) for c in classes], dtype=np.int32)
            rows = PartRows(
                group.column("key").to_pylist(),
                {name: list_to_matrix(group.column(name)) for name in self.tokens},
                labels,
                group.column("caption").to_pylist(),
                group.column("meta").to_pylist(),
                None if numeric else classes,
            )
            yield token_table(rows, self.layout, source, kept)


def tokenize_shard(tokenizer, task: ShardTask, batch_size: int, decode_threads: int, model_lock=None) -> ShardTokens:
    """Encode every image of the shard `task.url` into `task.out/task.part`; rows written +
    samples rejected = samples read. The sample's `txt`, `json` and `cls` travel with its tokens
    (`caption`, `meta`, and `label` when `cls` is an integer, else a `cls` text column).

    Raises ShardUnreadable when the shard cannot be read whole; nothing is written then.
    Memory is bounded by the batch, a decode window of twice the batch and a row group of the
    part (spooled to a local temporary file until the shard ends), whatever the shard's size.
    `model_lock` (a lock shared by the shards one actor tokenizes at once) serialises the
    forward passes, so that one shard's reading, decoding and writing overlap another's compute."""
    rejects: list[dict] = []
    samples = 0
    window = max(2 * batch_size, 4 * decode_threads)
    with tempfile.TemporaryDirectory(prefix="vqpipe-part-") as spool_dir:
        part = _PartBuilder(tokenizer, batch_size, model_lock, str(Path(spool_dir) / "rows.parquet"))
        for sample in decoded_samples(task.url, tokenizer.image_size, decode_threads, window, task.limits):
            samples += 1
            if sample.reject is not None:
                rejects.append({"key": sample.fields["__key__"], "reason": sample.reject})
            else:
                part.add(sample.fields, sample.image)
        source = {"input_shard": task.name, "samples": samples, "rejects": rejects}
        write_part_groups(part.tables(source), f"{task.out.rstrip('/')}/{task.part}")
    return ShardTokens(input_shard=task.name, part=task.part, samples=samples, rows=part.rows, rejects=rejects)
