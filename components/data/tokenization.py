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
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import torch

from components.data.corpus import read_shard
from components.data.images import DECODE_ERRORS, decode_image, describe_error, to_array
from components.data.shards import sample_image_bytes
from components.data.tokens import token_table, write_part


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
    taken: dict[str, str] = {}
    for url, n in names.items():  # same path under two schemes: tell them apart by position
        if n in taken.values():
            n = n.removesuffix(".parquet") + f"-{len(taken)}.parquet"
        taken[url] = n
    return taken


def _text(value: bytes | str | None) -> str | None:
    """A sample's text field (`txt`, `json`, `cls`) as a string; undecodable bytes are replaced."""
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _label(cls: str | None) -> int | None:
    """An integer class id from `cls`, None when absent or not an integer."""
    if cls is None:
        return None
    try:
        return int(cls.strip())
    except ValueError:
        return None


def _decode(data: bytes, size: int) -> np.ndarray:
    return to_array(decode_image(data, size))


def tokenize_shard(
    tokenizer,
    url: str,
    out: str,
    part: str,
    *,
    input_name: str | None = None,
    batch_size: int = 256,
    decode_threads: int = 2,
    model_lock=None,
) -> ShardTokens:
    """Encode every image of the shard at `url` into `out/part`; rows written + samples rejected
    = samples read. The sample's `txt`, `json` and `cls` travel with its tokens (`caption`,
    `meta`, and `label` when `cls` is an integer, else a `cls` text column).

    Raises ShardUnreadable when the shard cannot be read whole; nothing is written then.
    Memory is bounded by the batch and a decode window of twice the batch, whatever the shard's
    size. `input_name` is what the part records as its input (default: `url`). `model_lock`
    (a lock shared by the shards one worker tokenizes at once) serialises the forward passes,
    so that one shard's reading, decoding and writing overlap another's compute."""
    size = tokenizer.image_size
    keys: list[str] = []
    captions: list[str | None] = []
    meta: list[str | None] = []
    classes: list[str | None] = []
    tokens: dict[str, list[np.ndarray]] = {name: [] for name in tokenizer.token_columns}
    rejects: list[dict] = []
    batch: list[np.ndarray] = []
    samples = 0
    window = max(2 * batch_size, 4 * decode_threads)
    pending: deque[tuple[dict, Future | None]] = deque()

    def flush() -> None:
        if batch:
            x = torch.from_numpy(np.stack(batch)).float().div_(255.0)
            with model_lock or contextlib.nullcontext(), torch.inference_mode():
                for name, column in tokenizer.encode_columns(x).items():
                    tokens[name].append(column.cpu().numpy())
            batch.clear()

    def take(limit: int) -> None:
        """Collect decoded images in shard order until at most `limit` are in flight."""
        while len(pending) > limit:
            sample, future = pending.popleft()
            if future is None:
                rejects.append({"key": sample["__key__"], "reason": "no image field"})
                continue
            try:
                image = future.result()
            except DECODE_ERRORS as err:
                rejects.append({"key": sample["__key__"], "reason": describe_error(err)})
                continue
            keys.append(sample["__key__"])
            captions.append(_text(sample.get("txt")))
            meta.append(_text(sample.get("json")))
            classes.append(_text(sample.get("cls")))
            batch.append(image)
            if len(batch) >= batch_size:
                flush()

    with ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode") as pool:
        try:
            for sample in read_shard(url):
                samples += 1
                data = sample_image_bytes(sample)
                text = {k: sample.get(k) for k in ("__key__", "txt", "json", "cls")}
                pending.append((text, None if data is None else pool.submit(_decode, data, size)))
                take(window)
            take(0)
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()
    flush()

    grids = tokenizer.column_grids
    columns = {
        name: np.concatenate(chunks) if chunks else np.zeros((0, grids[name][0] * grids[name][1]), dtype=np.int64)
        for name, chunks in tokens.items()
    }
    labels = [_label(c) for c in classes]
    numeric = all(lbl is not None for lbl, c in zip(labels, classes) if c is not None)
    label_array = (
        np.asarray([-1 if lbl is None else lbl for lbl in labels], dtype=np.int32)
        if numeric and any(c is not None for c in classes)
        else None
    )
    name = input_name or url
    table = token_table(
        keys,
        columns,
        label_array,
        fingerprint=tokenizer.fingerprint,
        codebook_size=tokenizer.codebook_size,
        grid=grids,
        levels=[tokenizer.level_columns(level) for level in tokenizer.levels],
        captions=captions,
        meta=meta,
        classes=None if numeric else classes,
        source={"input_shard": name, "samples": samples, "rejects": rejects},
    )
    write_part(table, f"{out.rstrip('/')}/{part}")
    return ShardTokens(input_shard=name, part=part, samples=samples, rows=len(keys), rejects=rejects)
