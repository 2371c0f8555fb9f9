"""Token parts -> data a language model trains on: packed id arrays (nanoGPT's `train.bin`,
`val.bin`) or Parquet rows of `input_ids`, with `meta.json` giving the vocabulary and lineage.

One vocabulary of `vocab_size` ids (meta.json's names):

    [0, text_vocab_size)         text: UTF-8 bytes (256 ids) or a Hugging Face `tokenizers`
                                 file's ids; empty when the export has no text vocabulary
    [image_offset, ...)          image codes, token column after token column: code k of column
                                 c is `columns[c].offset + k` (`codebook_sizes[c]` ids each)
    then `special_tokens`        boi, eoi, sep_<column> for every token column after the first
                                 (a second tier, or a product group's / residual stage's
                                 column), pad (for batching Parquet rows; never in a .bin)

One image's sequence:

    [caption ids]  boi  [column 0's h*w codes, raster order]  sep_<column 1>  [column 1's]  ...  eoi

Caption ids are there only in an export with captions. A .bin holds its images' sequences back
to back: every id between one image's eoi and the next boi is that image's caption, and a window
cut anywhere re-synchronises at the next boi (`iter_bin_sequences` reads it back that way).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer as TextTokenizer

from components.data.shards import sha256_file
from components.data.tokens import PartInfo, list_to_matrix

META = "meta.json"
FORMAT_VERSION = 1
FORMATS = ("bin", "parquet")
BYTE_VOCAB = 256


class ExportError(ValueError):
    """An export that cannot be made as asked: parts of different tokenizers, an unusable text
    tokenizer, an output holding another export."""


class ByteText:
    """The default text vocabulary: a caption's UTF-8 bytes are its ids (256 of them)."""

    vocab_size = BYTE_VOCAB

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: np.ndarray) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "bytes", "vocab_size": BYTE_VOCAB}


class HFText:
    """A Hugging Face `tokenizers` JSON file, loaded from its path (nothing is downloaded); ids
    as it gives them, without its own special tokens (the export adds boi/eoi)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"text tokenizer {self.path} does not exist or is not a file")
        try:
            self.tokenizer = TextTokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises its own Exception type for a bad file
            raise ExportError(f"text tokenizer {self.path} does not load as a tokenizers JSON file: {err}") from err
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.vocab_size < 1:
            raise ExportError(f"text tokenizer {self.path} has an empty vocabulary")
        self.sha256 = sha256_file(self.path)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encoded]

    def decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict:
        return {"kind": "huggingface", "file": self.path.name, "sha256": self.sha256, "vocab_size": self.vocab_size}


@dataclass(frozen=True)
class ColumnIds:
    """Where one token column's codes sit in the vocabulary."""

    name: str
    offset: int
    codebook_size: int
    grid: tuple[int, int]
    tier: int
    separator: int | None  # the id before its codes (None: the first column, after boi)

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Vocabulary:
    text_vocab_size: int
    columns: tuple[ColumnIds, ...]
    special_tokens: dict = field(default_factory=dict)

    @classmethod
    def build(cls, text_vocab_size: int, info: PartInfo) -> Vocabulary:
        """Text first, then the image codes column by column (tier by tier, coarsest first),
        then boi, eoi, the separators and pad."""
        order = [name for tier in info.tiers for name in tier]
        tier_of = {name: t for t, tier in enumerate(info.tiers) for name in tier}
        sizes = info.codebook_sizes
        offset = text_vocab_size
        placed = []
        for name in order:
            placed.append((name, offset))
            offset += sizes[name]
        specials = {"boi": offset, "eoi": offset + 1}
        next_id = offset + 2
        for name in order[1:]:
            specials[f"sep_{name}"] = next_id
            next_id += 1
        specials["pad"] = next_id
        columns = tuple(
            ColumnIds(
                name,
                start,
                sizes[name],
                tuple(info.grid[name]),
                tier_of[name],
                None if i == 0 else specials[f"sep_{name}"],
            )
            for i, (name, start) in enumerate(placed)
        )
        return cls(text_vocab_size, columns, specials)

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.special_tokens["pad"] + 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    @property
    def boi(self) -> int:
        return self.special_tokens["boi"]

    @property
    def eoi(self) -> int:
        return self.special_tokens["eoi"]

    @property
    def image_length(self) -> int:
        """Ids of one image's frame: boi, every column's codes and separators, eoi."""
        return 2 + sum(c.length for c in self.columns) + len(self.columns) - 1

    def to_meta(self) -> dict:
        return {
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "text_vocab_size": self.text_vocab_size,
            "image_offset": self.image_offset,
            "codebook_sizes": {c.name: c.codebook_size for c in self.columns},
            "grids": {c.name: list(c.grid) for c in self.columns},
            "columns": [{**asdict(c), "grid": list(c.grid)} for c in self.columns],
            "special_tokens": dict(self.special_tokens),
            "image_length": self.image_length,
        }

    @classmethod
    def from_meta(cls, meta: dict) -> Vocabulary:
        columns = tuple(ColumnIds(**{**c, "grid": tuple(c["grid"])}) for c in meta["columns"])
        return cls(meta["text_vocab_size"], columns, dict(meta["special_tokens"]))


@dataclass
class CaptionCounts:
    """What happened to the captions of the rows exported: counts that add up to the rows."""

    written: int = 0
    missing: int = 0  # rows without one (nothing before boi)
    truncated: int = 0  # cut to max_caption_tokens
    invalid_utf8: int = 0  # bytes that are not UTF-8, replaced by U+FFFD (written too)

    def add(self, other: CaptionCounts) -> None:
        for name in ("written", "missing", "truncated", "invalid_utf8"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def caption_texts(column: pa.ChunkedArray | pa.Array | None, rows: int) -> tuple[list[str | None], int]:
    """A part's `caption` column as Python strings (None where null), bytes that are not UTF-8
    replaced by U+FFFD as ingestion does; and how many rows needed it."""
    if column is None:
        return [None] * rows, 0
    raw = column.cast(pa.binary()).to_pylist()
    texts, invalid = [], 0
    for value in raw:
        if value is None:
            texts.append(None)
            continue
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(value.decode("utf-8", errors="replace"))
            invalid += 1
    return texts, invalid


def _ragged(pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    flat = np.concatenate(pieces).astype(np.int64) if pieces and lengths.sum() else np.zeros(0, dtype=np.int64)
    return flat, lengths


def _spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices starts[i] .. starts[i] + lengths[i] - 1 for every i, back to back, without a loop."""
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + within


def _utf8(arr: pa.Array) -> bool:
    """Whether every value of a binary array is UTF-8 (Arrow's check, vectorised)."""
    try:
        arr.cast(pa.string())
    except pa.ArrowInvalid:
        return False
    return True


def caption_ids(
    column: pa.ChunkedArray | pa.Array | None, rows: int, text: ByteText | HFText, max_tokens: int
) -> tuple[np.ndarray, np.ndarray, CaptionCounts]:
    """Every row's caption ids, back to back, and their lengths (0 without a caption), cut to
    `max_tokens`; and what happened to the captions. Bytes: straight from the column's buffers,
    with no loop over rows (unless some row is not UTF-8); a text tokenizer: its batch encoding."""
    counts = CaptionCounts()
    if column is None:
        counts.missing = rows
        return np.zeros(0, dtype=np.int64), np.zeros(rows, dtype=np.int64), counts
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(pa.binary())
    present = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    counts.written = int(present.sum())
    counts.missing = rows - counts.written
    if isinstance(text, ByteText) and _utf8(arr):
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + rows + 1].astype(np.int64)
        data = (
            np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
        )
        flat, starts, lengths = data, offsets[:-1], np.where(present, offsets[1:] - offsets[:-1], 0)
    else:
        texts, counts.invalid_utf8 = caption_texts(arr, rows)
        encoded = text.encode([t for t in texts if t is not None]) if counts.written else []
        it = iter(encoded)
        flat, lengths = _ragged([next(it) if t is not None else np.zeros(0, dtype=np.int64) for t in texts])
        starts = np.cumsum(lengths) - lengths
    counts.truncated = int((lengths > max_tokens).sum())
    cut = np.minimum(lengths, max_tokens)
    ids = flat[_spans(starts, cut)].astype(np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= text.vocab_size):
        raise ExportError(f"the text tokenizer gave ids outside its vocabulary [0, {text.vocab_size})")
    return ids, cut, counts


def image_ids(record: pa.RecordBatch | pa.Table, vocab: Vocabulary) -> np.ndarray:
    """(n, image_length) int64: every row's framed image, boi .. eoi."""
    n = record.num_rows
    pieces = [np.full((n, 1), vocab.boi, dtype=np.int64)]
    for column in vocab.columns:
        if column.separator is not None:
            pieces.append(np.full((n, 1), column.separator, dtype=np.int64))
        codes = list_to_matrix(record.column(column.name)) if n else np.zeros((0, column.length), dtype=np.int64)
        if codes.shape[1] != column.length:
            raise ExportError(
                f"column {column.name} has rows of {codes.shape[1]} tokens, its grid says {column.length}"
            )
        if n and (codes.min() < 0 or codes.max() >= column.codebook_size):
            raise ExportError(f"column {column.name} holds codes outside [0, {column.codebook_size})")
        pieces.append(codes + column.offset)
    pieces.append(np.full((n, 1), vocab.eoi, dtype=np.int64))
    return np.concatenate(pieces, axis=1)


def sequences(
    record: pa.RecordBatch | pa.Table,
    vocab: Vocabulary,
    text: ByteText | HFText | None,
    max_caption_tokens: int,
) -> tuple[np.ndarray, np.ndarray, CaptionCounts]:
    """The rows' sequences, back to back: (flat ids, per-row lengths, caption counts). With
    `text`, each row's caption ids (at most `max_caption_tokens`) come before its boi."""
    images = image_ids(record, vocab)
    n, length = images.shape
    counts = CaptionCounts()
    if text is None:
        return images.reshape(-1), np.full(n, length, dtype=np.int64), counts
    column = record.column("caption") if "caption" in record.schema.names else None
    captions, caption_lengths, counts = caption_ids(column, n, text, max_caption_tokens)
    lengths = caption_lengths + length
    starts = np.cumsum(lengths) - lengths
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    flat[(starts + caption_lengths)[:, None] + np.arange(length)] = images
    flat[_spans(starts, caption_lengths)] = captions
    return flat, lengths, counts


@dataclass
class Sequence:
    """One image's sequence read back: its caption ids (text ids) and its codes per column."""

    caption_ids: np.ndarray
    codes: dict[str, np.ndarray]


def split_sequence(ids: np.ndarray, vocab: Vocabulary) -> Sequence:
    """One image's sequence (caption ids, boi .. eoi) -> its caption ids and codes per column;
    ExportError when it is not framed as the vocabulary says."""
    ids = np.asarray(ids, dtype=np.int64)
    boi = np.flatnonzero(ids == vocab.boi)
    if len(boi) != 1 or ids[-1] != vocab.eoi or len(ids) - boi[0] != vocab.image_length:
        raise ExportError("not one framed image (caption ids, boi, codes and separators, eoi)")
    caption, position, codes = ids[: boi[0]], boi[0] + 1, {}
    for column in vocab.columns:
        if column.separator is not None:
            if ids[position] != column.separator:
                raise ExportError(f"expected sep_{column.name} at {position}")
            position += 1
        block = ids[position : position + column.length] - column.offset
        if block.min() < 0 or block.max() >= column.codebook_size:
            raise ExportError(f"column {column.name}'s ids are outside its range")
        codes[column.name] = block
        position += column.length
    return Sequence(caption, codes)


def iter_bin_sequences(path: str | Path, vocab: Vocabulary, chunk: int = 1 << 22) -> Iterator[Sequence]:
    """The images of a packed .bin, in order, read through a memory map `chunk` ids at a time:
    every image ends at an eoi, and its sequence starts after the previous image's eoi."""
    data = np.memmap(path, dtype=vocab.dtype, mode="r")
    start = 0
    while start < len(data):
        stop = min(start + max(chunk, 4 * vocab.image_length), len(data))
        window = np.asarray(data[start:stop], dtype=np.int64)
        ends = np.flatnonzero(window == vocab.eoi)
        if not len(ends):
            if stop == len(data):
                raise ExportError(f"{path} ends inside an image (no eoi after id {start})")
            chunk *= 2  # a caption longer than the window
            continue
        begin = 0
        for end in ends:
            yield split_sequence(window[begin : end + 1], vocab)
            begin = end + 1
        start += begin


def read_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a finished vqpipe export (run vqpipe export)")
    meta = json.loads(path.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} is export format {meta['format_version']}; this vqpipe reads up to {FORMAT_VERSION}")
    return meta
