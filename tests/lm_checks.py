"""Reading a `vqpipe export` back and checking it against the token parts it came from (used by
the export tests and by the tests that run every quantizer and architecture)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.data import lm_export as lm
from components.data import tokens as token_io


def read_back(out: Path) -> dict[str, list[lm.Sequence]]:
    """Every split's sequences, split at their framing: .bin through the memory map, Parquet
    rows one by one."""
    meta = lm.read_meta(out)
    vocab = lm.Vocabulary.from_meta(meta)
    splits = {}
    for split, info in meta["splits"].items():
        if meta["format"] == "bin":
            splits[split] = list(lm.iter_bin_sequences(out / f"{split}.bin", vocab, chunk=257))
        else:
            rows = [row for name in info["files"] for row in pq.read_table(out / name).column("input_ids").to_pylist()]
            splits[split] = [lm.split_sequence(np.asarray(row), vocab) for row in rows]
    return splits


def source_tables(token_dir: Path | str, split: str) -> list[pa.Table]:
    """The parts of one split (a local folder or an fsspec URL), in the manifest's order."""
    manifest = token_io.read_manifest(token_dir)
    fs, root = fsspec.core.url_to_fs(str(token_dir))
    tables = []
    for part in manifest["parts"]:
        if (part.get("split") or "train") == split and part["rows"] > 0:
            with fs.open(f"{root}/{part['part']}", "rb") as f:
                tables.append(pq.read_table(f))
    return tables


def assert_round_trip(out: Path, token_dir: Path | str) -> dict[str, list[lm.Sequence]]:
    """The export's image ids are the parts' tokens, column by column and row by row, and its
    caption ids (UTF-8 bytes) the parts' captions; returns what was read back."""
    meta = lm.read_meta(out)
    back = read_back(out)
    for split, sequences in back.items():
        tables = source_tables(token_dir, split)
        assert len(sequences) == sum(t.num_rows for t in tables) == meta["splits"][split]["images"]
        for name in meta["codebook_sizes"]:
            expected = np.concatenate([token_io.list_to_matrix(t.column(name)) for t in tables])
            assert np.array_equal(np.stack([s.codes[name] for s in sequences]), expected), name
        if meta["captions"] and meta["text_tokenizer"]["kind"] == "bytes":
            captions = [
                c
                for t in tables
                for c in (t.column("caption").to_pylist() if "caption" in t.schema.names else [None] * t.num_rows)
            ]
            for seq, caption in zip(sequences, captions, strict=True):
                expected = (caption or "").encode()[: meta["max_caption_tokens"]]
                assert bytes(seq.caption_ids.astype(np.uint8)) == expected
        elif not meta["captions"]:
            assert all(len(s.caption_ids) == 0 for s in sequences)
    return back


def flattened(sequences: list[lm.Sequence], tiers: list[list[str]]) -> np.ndarray:
    """(n, L) in the order the prior and `Tokenizer.unflatten` use (`token_io.sequences`)."""
    table = pa.table(
        {
            name: token_io.tokens_array(np.stack([s.codes[name] for s in sequences]), 1 << 16)
            for tier in tiers
            for name in tier
        }
    )
    return token_io.sequences(table, tiers)
