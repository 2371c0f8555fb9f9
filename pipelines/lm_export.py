"""`vqpipe export` and the pipeline's `export` stage: token parts -> LM-ready data
(`components.data.lm_export` documents the vocabulary and the sequences).

    vqpipe export --input data/tokens --output data/lm --format bin --captions
    python -m pipelines.lm_export        # the stage: params.yaml's `export`, data/tokens -> data/lm

Streamed a record batch at a time (memory holds `batch_rows` rows, never a part or the corpus),
resumable and idempotent as `vqpipe tokenize` is:

- `bin`: `{split}.bin` grow part by part; after each part they are synced and `_progress.json`
  records their lengths and the parts done. A rerun cuts the files back to those lengths and
  goes on from the next part, so a killed export ends with the same bytes as one never killed.
- `parquet`: one `{split}-{k:05d}.parquet` per input part (k: the part's place in its split),
  written under a temporary name and renamed when whole; a rerun keeps the ones that exist.
- `meta.json` is written last: an output with it is finished, and a rerun with the same inputs
  and settings does nothing. An output holding an export of other inputs or settings is
  refused, naming what differs, unless `overwrite`.

Splits are the token manifest's (`train`, `val` for the pipeline's tokens); parts of a corpus
tokenized without splits all go to `train`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components import __version__
from components.config import ExportConfig
from components.data import lm_export as lm
from components.data import tokens as token_io
from components.data.shards import MANIFEST as SHARD_MANIFEST
from components.data.shards import sha256_file
from components.io import fsync_path, is_url, write_json
from pipelines.corpus.planning import output_lock
from pipelines.runtime import Paths, stage_main
from pipelines.tracking import stage_run, tokens_input

log = logging.getLogger("vqpipe.export")

PROGRESS = "_progress.json"
LOCK_FILE = ".vqpipe-export.lock"
DEFAULTS = ExportConfig()  # the stage's defaults are the command's


@dataclass
class ExportResult:
    output: Path
    meta: dict
    parts_written: int  # this run
    parts_skipped: int  # already done by an earlier run
    rows: int  # this run
    ids: int  # this run
    bytes_read: int  # token parts read this run (their file sizes)
    seconds: float
    already_complete: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        """Megabytes of token parts read per second."""
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _text_vocabulary(captions: bool, text_tokenizer: str | Path | None) -> lm.ByteText | lm.HFText | None:
    """The text tokenizer given, else bytes when captions are wanted, else none."""
    if text_tokenizer is not None:
        return lm.HFText(text_tokenizer)
    return lm.ByteText() if captions else None


def _parts(root: str, manifest: dict) -> list[dict]:
    """The manifest's parts with rows, each with its split (`train` when the manifest has none),
    its place in that split and its path on the input's filesystem."""
    seen: dict[str, int] = {}
    out = []
    for entry in manifest["parts"]:
        if entry["rows"] <= 0:
            continue
        split = entry.get("split") or "train"
        out.append({**entry, "split": split, "index": seen.get(split, 0), "path": f"{root}/{entry['part']}"})
        seen[split] = seen.get(split, 0) + 1
    return out


def _check_fingerprints(parts: list[dict], infos: list[token_io.PartInfo], manifest: dict) -> None:
    """Every part from one tokenizer, the manifest's, with one token layout; refused naming both
    fingerprints (whole: they are what a user compares) and the parts."""
    named = [(f"the manifest ({token_io.MANIFEST})", manifest["tokenizer_fingerprint"])]
    named += [(part["part"], info.fingerprint) for part, info in zip(parts, infos, strict=True)]
    for name, fingerprint in named[1:]:
        if fingerprint != named[0][1]:
            first = next((n for n, f in named[1:] if f == named[0][1]), named[0][0])
            raise lm.ExportError(
                f"token parts from different tokenizers: {name} was made by tokenizer {fingerprint}, "
                f"{first} by {named[0][1]}; export the parts of one tokenizer (re-tokenize the others)"
            )
    for part, info in zip(parts, infos, strict=True):
        if info.grid != infos[0].grid or info.tiers != infos[0].tiers:
            raise lm.ExportError(
                f"{part['part']} has token columns {info.grid}, {parts[0]['part']} has {infos[0].grid}"
            )


def _lineage(input_dir: str, manifest: dict, manifest_sha: str) -> dict:
    """Which tokenizer and source made the data: from the manifest's own lineage (the pipeline's
    tokenize stage records it), else from the shard manifest beside the input shards when there
    is one (the pipeline's shard output), else the input shards' names."""
    lineage = dict(manifest.get("lineage") or {})
    shards = [p["input_shard"] for p in manifest["parts"]]
    if not lineage and shards and not is_url(shards[0]) and not is_url(input_dir):
        # A relative shard path is the project's (the pipeline's data/tokens names data/shards/...).
        first = Path(shards[0])
        project = Path(input_dir).resolve().parent.parent
        beside = (first if first.is_absolute() else project / first).parent / SHARD_MANIFEST
        if beside.is_file():
            lineage = {
                "source": json.loads(beside.read_text()).get("source"),
                "source_fingerprint": None,
                "shard_manifest_sha256": sha256_file(beside),
            }
    return {
        "source": lineage.get("source")
        or (f"{len(shards)} input shards, {shards[0]} .. {shards[-1]}" if shards else None),
        "source_fingerprint": lineage.get("source_fingerprint"),
        "shard_manifest_sha256": lineage.get("shard_manifest_sha256"),
        "input_shards": len(shards),
        "token_manifest": f"{input_dir}/{token_io.MANIFEST}",
        "token_manifest_sha256": manifest_sha,
        "tokenizer_fingerprint": manifest["tokenizer_fingerprint"],
    }


def _read_manifest(fs, root: str, input_dir: str) -> tuple[dict, str]:
    try:
        with fs.open(f"{root}/{token_io.MANIFEST}", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{input_dir}/{token_io.MANIFEST} not found: --input must be a finished token output "
            "(vqpipe tokenize's, or the pipeline's data/tokens)"
        ) from None
    manifest = json.loads(raw)
    if not manifest.get("complete", True):
        failed = manifest.get("failed", [])
        raise lm.ExportError(
            f"{input_dir} is not complete: {len(failed)} input shards failed to tokenize "
            f"(first: {failed[0]['input_shard'] if failed else '?'}); rerun vqpipe tokenize on it first"
        )
    return manifest, hashlib.sha256(raw).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def export_lm(
    input_dir: str | Path,
    output: str | Path,
    fmt: str = "bin",
    captions: bool = False,
    text_tokenizer: str | Path | None = None,
    max_caption_tokens: int = DEFAULTS.max_caption_tokens,
    overwrite: bool = False,
    batch_rows: int = DEFAULTS.batch_rows,
    after_part=None,
) -> ExportResult:
    """Export the token parts in `input_dir` (a local folder or an fsspec URL) into the local
    folder `output`; see the module doc. `after_part(part)` is called after each part is
    written and recorded (tests kill an export there)."""
    if fmt not in lm.FORMATS:
        raise lm.ExportError(f"format must be one of {lm.FORMATS}, got {fmt!r}")
    if max_caption_tokens < 1:
        raise lm.ExportError(f"max_caption_tokens must be >= 1, got {max_caption_tokens}")
    if batch_rows < 1:
        raise lm.ExportError(f"batch_rows must be >= 1, got {batch_rows}")
    if is_url(output):
        raise lm.ExportError(f"--output must be a local folder (a .bin is read with np.memmap), got {output}")
    text = _text_vocabulary(captions, text_tokenizer)  # a tokenizer file that does not load fails here
    input_dir = str(input_dir).rstrip("/")
    fs, root = fsspec.core.url_to_fs(input_dir)
    manifest, manifest_sha = _read_manifest(fs, root, input_dir)
    parts = _parts(root, manifest)
    if not parts:
        raise lm.ExportError(f"{input_dir} has no token rows to export")
    infos = [token_io.part_info(p["path"], filesystem=fs) for p in parts]
    _check_fingerprints(parts, infos, manifest)
    vocab = lm.Vocabulary.build(text.vocab_size if text is not None else 0, infos[0])
    settings = {
        "format": fmt,
        "captions": captions,
        "max_caption_tokens": max_caption_tokens if captions else None,
        "text_tokenizer": text.describe() if text is not None else None,
        "tokenizer_fingerprint": manifest["tokenizer_fingerprint"],
        "token_manifest_sha256": manifest_sha,
    }
    out = Path(output)
    with output_lock(str(out), LOCK_FILE):
        state = _prepare(out, settings, overwrite)
        if state is None:
            meta = lm.read_meta(out)
            log.info("%s already holds this export (meta.json): nothing to do", out)
            return ExportResult(out, meta, 0, len(parts), 0, 0, 0, 0.0, already_complete=True)
        started = time.perf_counter()
        writer = _BinWriter(out, vocab, state) if fmt == "bin" else _ParquetWriter(out, vocab)
        written = rows = ids = read = 0
        done = set(state["done"])
        for part in parts:
            if part["part"] in done:
                continue
            counts = lm.CaptionCounts()
            part_rows = part_ids = 0
            with fs.open(part["path"], "rb") as f:
                parquet = pq.ParquetFile(f)
                for record in parquet.iter_batches(batch_size=batch_rows):
                    flat, lengths, batch_counts = lm.sequences(
                        record, vocab, text if captions else None, max_caption_tokens
                    )
                    writer.add(part, record, flat, lengths)
                    counts.add(batch_counts)
                    part_rows += record.num_rows
                    part_ids += len(flat)
            writer.finish_part(part)
            split = state["splits"].setdefault(part["split"], {"images": 0, "ids": 0, "parts": 0})
            split["images"] += part_rows
            split["ids"] += part_ids
            split["parts"] += 1
            for name, value in vars(counts).items():
                state["captions"][name] = state["captions"].get(name, 0) + value
            state["done"].append(part["part"])
            state["sizes"] = writer.sizes()
            write_json(out / PROGRESS, state)
            written, rows, ids = written + 1, rows + part_rows, ids + part_ids
            read += fs.size(part["path"])
            if after_part is not None:
                after_part(part)
        meta = _meta(vocab, settings, state, _lineage(input_dir, manifest, manifest_sha), writer.files(state))
        if captions and not state["captions"].get("written"):
            log.warning("no row of %s has a caption: the sequences hold no caption ids", input_dir)
        write_json(out / lm.META, meta)
        (out / PROGRESS).unlink()
        seconds = time.perf_counter() - started
    result = ExportResult(out, meta, written, len(parts) - written, rows, ids, read, seconds)
    log.info(
        "exported %d rows (%d ids) from %d parts in %.2f s (%.0f rows/s, %.1f MB/s of parts) to %s",
        rows,
        ids,
        written,
        seconds,
        result.rows_per_second,
        result.mb_per_second,
        out,
    )
    return result


def _prepare(out: Path, settings: dict, overwrite: bool) -> dict | None:
    """The progress to go on from (a fresh one for an empty output), or None when `out` already
    holds this export. Refuses an output holding something else unless `overwrite`."""
    meta_path, progress_path = out / lm.META, out / PROGRESS
    existing = None
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text()).get("settings", {})
        if existing == settings and not overwrite:
            return None
    elif progress_path.is_file():
        existing = json.loads(progress_path.read_text()).get("settings", {})
        if existing == settings and not overwrite:
            return json.loads(progress_path.read_text())
    others = [p.name for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if others and not overwrite:
        what = (
            "an export of other settings or inputs (" + "; ".join(_differences(existing, settings)) + ")"
            if existing is not None
            else f"files that are not a vqpipe export ({', '.join(sorted(others)[:5])})"
        )
        raise lm.ExportError(f"{out} holds {what}; give another --output, or --overwrite to replace it")
    for name in others:
        target = out / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return {"settings": settings, "done": [], "sizes": {}, "splits": {}, "captions": {}}


class _BinWriter:
    """`{split}.bin`, appended part by part; on resume cut back to the recorded lengths (in ids)."""

    def __init__(self, out: Path, vocab: lm.Vocabulary, state: dict):
        self.out, self.dtype = out, vocab.dtype
        self.handles: dict[str, object] = {}
        self.lengths = dict(state.get("sizes", {}))
        for path in out.glob("*.bin"):  # what a killed run appended after its last record
            keep = self.lengths.get(path.stem, 0) * self.dtype.itemsize
            if path.stat().st_size != keep:
                os.truncate(path, keep)

    def _handle(self, split: str):
        if split not in self.handles:
            self.handles[split] = open(self.out / f"{split}.bin", "ab")  # closed in finish_part
        return self.handles[split]

    def add(self, part: dict, record, flat: np.ndarray, lengths: np.ndarray) -> None:
        self._handle(part["split"]).write(flat.astype(self.dtype).tobytes())
        self.lengths[part["split"]] = self.lengths.get(part["split"], 0) + len(flat)

    def finish_part(self, part: dict) -> None:
        handle = self._handle(part["split"])
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        del self.handles[part["split"]]

    def sizes(self) -> dict:
        return dict(self.lengths)

    def files(self, state: dict) -> dict:
        return {split: [f"{split}.bin"] for split in state["splits"]}


class _ParquetWriter:
    """One Parquet file per input part: `input_ids`, `key`, `label`, `caption`."""

    def __init__(self, out: Path, vocab: lm.Vocabulary):
        self.out, self.vocab = out, vocab
        self.type = pa.uint16() if vocab.dtype == np.uint16 else pa.uint32()
        self.schema = pa.schema(
            [
                ("input_ids", pa.list_(self.type)),
                ("key", pa.string()),
                ("label", pa.int32()),
                ("caption", pa.string()),
            ]
        )
        self.writer: pq.ParquetWriter | None = None
        self.tmp: Path | None = None

    @staticmethod
    def name(part: dict) -> str:
        return f"{part['split']}-{part['index']:05d}.parquet"

    def add(self, part: dict, record, flat: np.ndarray, lengths: np.ndarray) -> None:
        if self.writer is None:
            self.tmp = self.out / f".{self.name(part)}.tmp"
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(self.type.to_pandas_dtype())))
        n = record.num_rows
        names = record.schema.names
        label = record.column("label") if "label" in names else pa.nulls(n, pa.int32())
        caption = _caption_column(record.column("caption"), n) if "caption" in names else pa.nulls(n, pa.string())
        self.writer.write_table(
            pa.table([ids, record.column("key"), label.cast(pa.int32()), caption], schema=self.schema)
        )

    def finish_part(self, part: dict) -> None:
        if self.writer is None:  # no rows came (parts are listed only with rows > 0)
            raise lm.ExportError(f"{part['part']} holds no rows; its manifest entry says {part['rows']}")
        self.writer.close()
        fsync_path(self.tmp)
        os.replace(self.tmp, self.out / self.name(part))
        self.writer, self.tmp = None, None

    def sizes(self) -> dict:
        return {}

    def files(self, state: dict) -> dict:
        return {split: sorted(p.name for p in self.out.glob(f"{split}-*.parquet")) for split in state["splits"]}


def _caption_column(column, rows: int) -> pa.Array:
    """The captions as a string column: as they are when valid UTF-8 (checked by Arrow), else
    with U+FFFD for the bad bytes, as in the ids."""
    try:
        return column.cast(pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array(lm.caption_texts(column, rows)[0], pa.string())


SEQUENCE_DOC = (
    "[caption ids] boi [codes of columns[0]] sep_<columns[1].name> [codes of columns[1]] ... eoi; "
    "caption ids only when captions is true; code k of a column is columns[i].offset + k"
)


def _meta(vocab: lm.Vocabulary, settings: dict, state: dict, lineage: dict, files: dict) -> dict:
    return {
        "format_version": lm.FORMAT_VERSION,
        "format": settings["format"],
        **vocab.to_meta(),
        "captions": settings["captions"],
        "max_caption_tokens": settings["max_caption_tokens"],
        "text_tokenizer": settings["text_tokenizer"],
        "sequence": SEQUENCE_DOC,
        "tokenizer_fingerprint": settings["tokenizer_fingerprint"],
        "lineage": lineage,
        "splits": {
            split: {**counts, "files": files.get(split, [])} for split, counts in sorted(state["splits"].items())
        },
        "caption_counts": state["captions"] if settings["captions"] else None,
        "settings": settings,
        "vqpipe_version": __version__,
    }


def log_to_mlflow(result: ExportResult) -> None:
    """The export's lineage, vocabulary and counts on the active MLflow run; meta.json as an
    artifact."""
    import mlflow

    meta = result.meta
    lineage = meta["lineage"]
    mlflow.set_tags(
        {
            "vqpipe.tokenizer_fingerprint": meta["tokenizer_fingerprint"],
            "vqpipe.export.source": str(lineage["source"])[:5000],
            "vqpipe.export.token_manifest_sha256": lineage["token_manifest_sha256"],
            **(
                {"vqpipe.export.shard_manifest_sha256": lineage["shard_manifest_sha256"]}
                if lineage.get("shard_manifest_sha256")
                else {}
            ),
            **(
                {"vqpipe.export.source_fingerprint": lineage["source_fingerprint"]}
                if lineage.get("source_fingerprint")
                else {}
            ),
        }
    )
    with contextlib.suppress(Exception):  # params already logged by a stage run with the same values
        mlflow.log_params(
            {
                "export.format": meta["format"],
                "export.captions": meta["captions"],
                "export.vocab_size": meta["vocab_size"],
                "export.text_vocab_size": meta["text_vocab_size"],
                "export.dtype": meta["dtype"],
            }
        )
    metrics = {f"{split}_images": s["images"] for split, s in meta["splits"].items()}
    metrics |= {f"{split}_ids": s["ids"] for split, s in meta["splits"].items()}
    if not result.already_complete:
        metrics |= {"rows_per_second": result.rows_per_second, "mb_per_second": result.mb_per_second}
    for name, value in (meta.get("caption_counts") or {}).items():
        metrics[f"captions_{name}"] = value
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(result.output / lm.META), artifact_path="export")


def run(cfg: ExportConfig, paths: Paths = Paths()) -> ExportResult:
    """The pipeline's `export` stage: data/tokens -> data/lm, in an MLflow run of its own."""
    with stage_run("export", cfg, [tokens_input(paths.tokens, "export")]):
        result = export_lm(
            paths.tokens,
            paths.lm,
            cfg.format,
            captions=cfg.captions,
            text_tokenizer=paths.within(cfg.text_tokenizer) if cfg.text_tokenizer else None,
            max_caption_tokens=cfg.max_caption_tokens,
            overwrite=True,  # DVC owns data/lm: whatever is there is a stale export
            batch_rows=cfg.batch_rows,
        )
        log_to_mlflow(result)
        return result


def main() -> None:
    stage_main("export", run)


if __name__ == "__main__":
    main()
