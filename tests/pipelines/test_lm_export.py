"""`vqpipe export` and the export stage: token parts -> packed ids or Parquet rows + meta.json,
read back exactly (ids and images), resumed after a kill, refused on bad input."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components.data import lm_export as lm
from components.data import shapes
from components.data import tokens as token_io
from components.data.shards import sha256_file
from components.tokenizers import Tokenizer
from flows.cli import main
from pipelines.lm_export import PROGRESS, export_lm
from tests.lm_checks import assert_round_trip, flattened, read_back, source_tables


def test_the_stage_exports_captioned_images_that_decode_to_the_tokenized_ones(tiny_project):
    paths, results = tiny_project
    meta = lm.read_meta(paths.lm)
    tok = Tokenizer.load(paths.tokenizer)
    # The vocabulary: 256 byte ids, the codes, then boi, eoi, pad; uint16 ids.
    assert meta["text_vocab_size"] == meta["image_offset"] == 256
    assert meta["codebook_sizes"] == {"tokens": tok.codebook_size} and meta["grids"] == {"tokens": [4, 4]}
    assert meta["special_tokens"] == {"boi": 256 + 16, "eoi": 256 + 17, "pad": 256 + 18}
    assert meta["vocab_size"] == 256 + 19 and meta["dtype"] == "uint16"
    # Lineage: which tokenizer, which source, which shard and token manifests.
    lineage = meta["lineage"]
    assert lineage["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"] == tok.fingerprint
    assert lineage["source"] == "builtin:shapes (num_images=160, seed=0)"
    assert lineage["shard_manifest_sha256"] == sha256_file(paths.shards / "manifest.json")
    assert lineage["token_manifest_sha256"] == sha256_file(paths.tokens / token_io.MANIFEST)
    assert meta["caption_counts"] == {"written": 160, "missing": 0, "truncated": 0, "invalid_utf8": 0}

    back = assert_round_trip(paths.lm, paths.tokens)
    val = token_io.read_tokens(token_io.split_parts(paths.tokens, "val"), fingerprint=tok.fingerprint)
    ids = flattened(back["val"], val.tiers)
    assert np.array_equal(ids, val.tokens)
    # The ids decode to the images the tokenizer makes of the parts' tokens (the same tensors).
    decoded = tok.decode(tok.unflatten(torch.from_numpy(ids)))
    assert torch.equal(decoded, tok.decode(tok.unflatten(torch.from_numpy(val.tokens))))
    # Each caption says what its image shows.
    for key, seq in zip(val.keys, back["val"], strict=True):
        assert lm.ByteText().decode(seq.caption_ids) == shapes.draw(int(key.removeprefix("shapes-"))).caption

    run = mlflow.search_runs(experiment_names=["vqpipe"], filter_string="tags.`vqpipe.stage` = 'export'").iloc[0]
    assert run["tags.vqpipe.tokenizer_fingerprint"] == tok.fingerprint
    assert run["tags.vqpipe.export.source"] == lineage["source"]
    assert run["tags.vqpipe.export.shard_manifest_sha256"] == lineage["shard_manifest_sha256"]
    assert run["metrics.val_images"] == meta["splits"]["val"]["images"] and run["params.export.format"] == "bin"


def test_parquet_rows_load_with_datasets_and_match_the_bin(tiny_project, tmp_path):
    from datasets import load_dataset

    paths, _ = tiny_project
    out = tmp_path / "rows"
    result = export_lm(paths.tokens, out, "parquet", captions=True, batch_rows=7)
    assert result.rows == 160 and result.parts_written == len(token_io.read_manifest(paths.tokens)["parts"])
    assert_round_trip(out, paths.tokens)
    data = load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf"))
    assert set(data) == {"train", "validation"}
    assert data["validation"].num_rows == lm.read_meta(out)["splits"]["val"]["images"]
    row = data["validation"][0]
    assert set(row) == {"input_ids", "key", "label", "caption"}
    # The same ids as the packed export, row for row.
    packed = np.memmap(paths.lm / "val.bin", dtype=np.uint16, mode="r")
    rows = np.concatenate([np.asarray(r, dtype=np.uint16) for r in data["validation"]["input_ids"]])
    assert np.array_equal(rows, packed)
    assert row["caption"] == lm.ByteText().decode(
        lm.split_sequence(np.asarray(row["input_ids"]), lm.Vocabulary.from_meta(lm.read_meta(out))).caption_ids
    )


def test_a_killed_export_resumes_to_the_same_bytes_and_a_finished_one_is_left_alone(tiny_project, tmp_path):
    paths, _ = tiny_project
    whole = tmp_path / "whole"
    export_lm(paths.tokens, whole, "bin", captions=True, max_caption_tokens=12)

    out = tmp_path / "killed"
    calls = []

    def kill_after_two(part):
        calls.append(part["part"])
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_lm(paths.tokens, out, "bin", captions=True, max_caption_tokens=12, after_part=kill_after_two)
    assert (out / PROGRESS).is_file() and not (out / lm.META).exists()
    with open(out / "train.bin", "ab") as f:  # what a kill between a write and its record leaves
        f.write(b"\x01\x02\x03")
    resumed = export_lm(paths.tokens, out, "bin", captions=True, max_caption_tokens=12)
    assert (
        resumed.parts_skipped == 2 and resumed.parts_written == len(token_io.read_manifest(paths.tokens)["parts"]) - 2
    )
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    meta = lm.read_meta(out)
    assert meta["splits"] == lm.read_meta(whole)["splits"] and meta["caption_counts"]["truncated"] == 160
    assert not (out / PROGRESS).exists()

    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = export_lm(paths.tokens, out, "bin", captions=True, max_caption_tokens=12)
    assert again.already_complete and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    # Other settings into the same output: refused, naming what differs, until --overwrite.
    with pytest.raises(lm.ExportError, match=r"max_caption_tokens: 12 -> 256.*--overwrite"):
        export_lm(paths.tokens, out, "bin", captions=True)
    export_lm(paths.tokens, out, "bin", captions=True, overwrite=True)
    assert (out / "train.bin").read_bytes() == (paths.lm / "train.bin").read_bytes()


def test_a_text_tokenizer_file_gives_the_caption_ids(tiny_project, tmp_path):
    from tokenizers import Tokenizer as TextTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    paths, _ = tiny_project
    text = TextTokenizer(models.WordLevel(unk_token="[UNK]"))
    text.pre_tokenizer = pre_tokenizers.Whitespace()
    captions = [
        c for split in ("train", "val") for t in source_tables(paths.tokens, split) for c in t["caption"].to_pylist()
    ]
    text.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    file = tmp_path / "words.json"
    text.save(str(file))

    out = tmp_path / "words"
    export_lm(paths.tokens, out, "bin", captions=True, text_tokenizer=file)
    meta = lm.read_meta(out)
    assert meta["text_vocab_size"] == meta["image_offset"] == text.get_vocab_size()
    assert meta["text_tokenizer"] == {
        "kind": "huggingface",
        "file": "words.json",
        "sha256": sha256_file(file),
        "vocab_size": text.get_vocab_size(),
    }
    words = lm.HFText(file)
    for split, sequences in read_back(out).items():
        expected = [c for t in source_tables(paths.tokens, split) for c in t["caption"].to_pylist()]
        assert [words.decode(s.caption_ids) for s in sequences] == expected
    assert_round_trip(out, paths.tokens)


def test_bad_input_is_refused_before_any_work(tiny_project, tmp_path):
    paths, _ = tiny_project
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ')
    out = tmp_path / "out"
    with pytest.raises(lm.ExportError, match="does not load as a tokenizers JSON file"):
        export_lm(paths.tokens, out, "bin", captions=True, text_tokenizer=broken)
    assert not out.exists()

    # Parts of two tokenizers: refused, naming both fingerprints in full.
    mixed = tmp_path / "mixed"
    shutil.copytree(paths.tokens, mixed)
    manifest = token_io.read_manifest(mixed)
    victim = mixed / manifest["parts"][-1]["part"]
    table = pq.read_table(victim)
    other = "0" * 64
    pq.write_table(
        table.replace_schema_metadata({**table.schema.metadata, b"vqpipe.tokenizer_fingerprint": other.encode()}),
        victim,
    )
    with pytest.raises(
        lm.ExportError, match=rf"{victim.name} was made by tokenizer {other}.*by {manifest['tokenizer_fingerprint']}"
    ):
        export_lm(mixed, out, "bin")
    assert not out.exists()

    with pytest.raises(FileNotFoundError, match="not found: --input must be a finished token output"):
        export_lm(tmp_path, out, "bin")
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(lm.ExportError, match=r"files that are not a vqpipe export \(notes.txt\)"):
        export_lm(paths.tokens, out, "bin")
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_exports_and_records_the_lineage_in_mlflow(tiny_project, tmp_path, capsys):
    paths, _ = tiny_project
    out = tmp_path / "cli"
    assert (
        main(["--repo", str(tmp_path), "export", "--input", str(paths.tokens), "--output", str(out), "--captions"]) == 0
    )
    printed = capsys.readouterr().out
    assert "bin, uint16, vocab_size 275" in printed and "160 rows" in printed
    assert (out / "train.bin").read_bytes() == (paths.lm / "train.bin").read_bytes()
    run = mlflow.search_runs(experiment_names=["vqpipe"], filter_string="tags.`vqpipe.command` = 'vqpipe export'").iloc[
        0
    ]
    assert run["params.export.input"] == str(paths.tokens) and run["status"] == "FINISHED"
    assert run["tags.vqpipe.export.token_manifest_sha256"] == lm.read_meta(out)["lineage"]["token_manifest_sha256"]
    artifact = mlflow.artifacts.download_artifacts(
        run_id=run["run_id"], artifact_path="export/meta.json", dst_path=str(tmp_path / "dl")
    )
    assert json.loads(open(artifact).read())["vocab_size"] == 275

    assert (
        main(
            [
                "export",
                "--input",
                str(paths.tokens),
                "--output",
                str(out),
                "--text-tokenizer",
                str(tmp_path / "none.json"),
                "--no-track",
            ]
        )
        == 2
    )
    assert "text tokenizer" in capsys.readouterr().err
