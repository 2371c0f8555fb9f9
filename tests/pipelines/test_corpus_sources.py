"""The corpora users already have, through the pipeline: an img2dataset-layout WebDataset corpus
at 256 px through shard -> train_tokenizer -> tokenize, and a Hugging Face-layout Parquet image
dataset through shard; bad inputs rejected or listed, counts adding up."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.config import parse_params
from components.data import tokens as token_io
from components.data.corpus import read_shard
from components.data.units import SourceError
from pipelines import shard, tokenize, train_tokenizer
from pipelines.runtime import Paths
from tests.conftest import TINY
from tests.corpus import make_corpus


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _caption_shard(path) -> None:
    """Captions a corpus really has: undecodable bytes, a very long one; and a repeated key."""
    with tarfile.open(path, "w") as tar:
        _add(tar, "cap-bad.png", _png((200, 0, 0)))
        _add(tar, "cap-bad.txt", b"caf\xe9 \xff au lait")
        _add(tar, "cap-long.png", _png((0, 200, 0)))
        _add(tar, "cap-long.txt", ("long " * 300).encode())
        _add(tar, "cap-dup.png", _png((0, 0, 200)))
        _add(tar, "cap-other.png", _png((9, 9, 9)))
        _add(tar, "cap-dup.png", _png((0, 0, 201)))  # the same key again, later in the shard


def _config(raw_shard: dict, **sections) -> object:
    return parse_params({**TINY, "shard": {**TINY["shard"], **raw_shard}, **sections})


def test_webdataset_corpus_at_256px_through_shard_train_tokenize(tmp_path, ray_cluster):
    truths = make_corpus(tmp_path / "corpus", shards=4, per_shard=6)  # the last one truncated
    _caption_shard(tmp_path / "corpus" / "captions.tar")
    listing = tmp_path / "shards.txt"
    names = [str(t.path) for t in truths] + [str(tmp_path / "corpus" / "captions.tar"), str(tmp_path / "gone.tar")]
    listing.write_text("# the corpus, and a shard that went missing\n" + "\n".join(names) + "\n")
    source = {"source": f"webdataset:@{listing}", "image_size": 256, "samples_per_shard": 8, "val_fraction": 0.25}
    source |= {"max_caption_chars": 100, "retries": 1}
    paths = Paths(tmp_path / "project")

    # Two of six inputs unreadable is far past the default 1%: the stage fails, naming them.
    with pytest.raises(shard.TooManyUnreadable, match=r"2 of 6 inputs could not be read"):
        shard.run(_config(source).shard, paths)
    params = _config({**source, "max_unreadable": 0.5}, train_tokenizer=_TINY_256)
    manifest = shard.run(params.shard, paths).manifest

    failed = {f["input"]: f for f in manifest["failed"]}
    assert set(failed) == {str(truths[-1].path), str(tmp_path / "gone.tar")}
    assert "truncated" in failed[str(truths[-1].path)]["error"]
    assert "no such shard" in failed[str(tmp_path / "gone.tar")]["error"]
    assert all(f["attempts"] == 2 for f in failed.values())
    # Exact accounting over the readable inputs: every sample written or rejected with its reason.
    readable = truths[:-1]
    good = {k for t in readable for k in t.good} | {"cap-bad", "cap-long", "cap-dup", "cap-other"}
    bad = {f"{t.path}#{k}": word for t in readable for k, word in t.bad.items()}
    bad[f"{tmp_path / 'corpus' / 'captions.tar'}#cap-dup"] = "duplicate"
    assert manifest["inputs"] == len(good) + len(bad) == sum(t.samples for t in readable) + 5
    assert manifest["samples"]["train"] + manifest["samples"]["val"] == len(good)
    rejects = [json.loads(line) for line in (paths.shards / "rejects.jsonl").read_text().splitlines()]
    assert {r["input"] for r in rejects} == set(bad)
    assert all(bad[r["input"]] in r["reason"] for r in rejects)
    assert manifest["captions"] == {"written": len(good) - 2, "invalid_utf8": 1, "truncated": 1}
    for entry in manifest["shards"]:
        assert entry["inputs"] == entry["samples"] + entry["rejected"]
        samples = list(read_shard(str(paths.shards / entry["name"])))
        assert len(samples) == entry["samples"]
        assert all(Image.open(io.BytesIO(s["png"])).size == (256, 256) for s in samples)

    result = train_tokenizer.run(params.train_tokenizer, paths)
    assert result.metrics["steps"] == 2 and np.isfinite(result.metrics["val_psnr"])
    tokens = tokenize.run(params.tokenize, paths).manifest
    assert tokens["rows"] == len(good) and tokens["rejected"] == 0
    data = token_io.read_tokens([paths.tokens / p["part"] for p in tokens["parts"]])
    assert sorted(data.keys) == sorted(good) and data.tokens.shape[1] == 16 * 16
    captions = {}
    for part in tokens["parts"]:
        table = pq.read_table(paths.tokens / part["part"])
        if "caption" in table.column_names:  # a part whose samples had no caption has no column
            captions.update(zip(table.column("key").to_pylist(), table.column("caption").to_pylist(), strict=True))
    assert captions["cap-bad"] == "caf\ufffd \ufffd au lait" and len(captions["cap-long"]) == 100
    assert captions[readable[0].good[0]] == f"caption {readable[0].good[0]} \u00e9"


_TINY_256 = {
    **TINY["train_tokenizer"],
    "downsample": 16,  # 256 px -> a 16 x 16 grid
    "steps": 2,
    "batch_size": 4,
    "lanes": 4,
    "val_every": 2,
    "registered_model": None,
}


def _parquet_dataset(root) -> dict:
    """Two files of a Hugging Face-layout dataset: image bytes in one, {bytes, path} structs in
    the other (null bytes: a file beside it), string labels, captions. Returns the truth."""
    root.mkdir(parents=True)
    (root / "images").mkdir()
    (root / "images" / "side.png").write_bytes(_png((1, 2, 3)))
    colours = [(10 * i, 20, 30) for i in range(6)]
    first = pa.table(
        {
            "image": pa.array([_png(c) for c in colours[:4]] + [b"not an image", None], type=pa.binary()),
            "label": ["dog", "cat", "dog", "emu", "cat", "dog"],
            "text": [f"picture {i}" for i in range(6)],
        }
    )
    pq.write_table(first, root / "train-00000-of-00002.parquet")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    second = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": _png((5, 5, 5)), "path": "a.png"},
                    {"bytes": None, "path": "images/side.png"},
                    {"bytes": None, "path": "images/missing.png"},
                ],
                type=struct,
            ),
            "label": ["emu", "cat", "cat"],
            "text": ["x", None, "z"],
        }
    )
    pq.write_table(second, root / "train-00001-of-00002.parquet")
    return {"written": 6, "rejected": 3}


def test_parquet_image_dataset_through_shard(tmp_path, ray_cluster):
    truth = _parquet_dataset(tmp_path / "ds")
    columns = {"image_column": "image", "label_column": "label", "caption_column": "text"}
    params = _config({"source": f"parquet:{tmp_path / 'ds'}", "parquet": columns, "val_fraction": 0.3})
    manifest = shard.run(params.shard, Paths(tmp_path / "project")).manifest

    assert manifest["classes"] == ["cat", "dog", "emu"]  # the sorted distinct values
    assert manifest["inputs"] == 9 and manifest["rejected"] == truth["rejected"]
    assert manifest["samples"]["train"] + manifest["samples"]["val"] == truth["written"]
    rejects = {
        json.loads(line)["input"].rsplit("/", 1)[-1]: json.loads(line)["reason"]
        for line in (tmp_path / "project" / "data" / "shards" / "rejects.jsonl").read_text().splitlines()
    }
    assert "not an image" in rejects["train-00000-of-00002.parquet#4"]
    assert "null" in rejects["train-00000-of-00002.parquet#5"]
    assert "missing.png" in rejects["train-00001-of-00002.parquet#2"]
    samples = {
        s["__key__"]: s
        for entry in manifest["shards"]
        for s in read_shard(str(tmp_path / "project" / "data" / "shards" / entry["name"]))
    }
    first, second = "train-00000-of-00002-00000000", "train-00001-of-00002-00000001"
    assert samples[first]["cls"] == b"1" and samples[first]["txt"] == b"picture 0"
    assert json.loads(samples[first]["json"])["class_name"] == "dog"
    # The struct's null bytes were read from its path, relative to the Parquet file.
    assert samples[second]["cls"] == b"0" and "txt" not in samples[second]
    assert np.asarray(Image.open(io.BytesIO(samples[second]["png"])))[0, 0].tolist() == [1, 2, 3]
    # One Ray task per file gives the same shards, byte for byte.
    on_ray = shard.run(params.shard.model_copy(update={"ray_min_inputs": 1}), Paths(tmp_path / "ray")).manifest
    assert [s["sha256"] for s in on_ray["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_parquet_class_label_names_come_from_the_schema(tmp_path):
    (tmp_path / "ds").mkdir()
    features = {"image": {"_type": "Image"}, "label": {"names": ["zebra", "ant"], "_type": "ClassLabel"}}
    table = pa.table({"image": [_png((1, 1, 1)), _png((2, 2, 2))], "label": pa.array([1, 0], type=pa.int64())})
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "ds" / "data.parquet")
    params = _config({"source": f"parquet:{tmp_path / 'ds' / '*.parquet'}", "parquet": {"label_column": "label"}})
    manifest = shard.run(params.shard, Paths(tmp_path / "project")).manifest
    assert manifest["classes"] == ["zebra", "ant"]  # in the schema's order, not sorted


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"label_column": "labels"}, r"label_column: .* has no column 'labels' \(its columns: image, label, text\)"),
        ({"caption_column": "label", "image_column": "text"}, r"image_column: column 'text' .* is string, not bytes"),
        ({"caption_column": "image"}, r"caption_column: column 'image' .* is binary, not a string"),
    ],
)
def test_a_parquet_column_missing_or_of_the_wrong_type_fails_before_any_work(tmp_path, columns, message):
    _parquet_dataset(tmp_path / "ds")
    params = _config({"source": f"parquet:{tmp_path / 'ds'}", "parquet": columns})
    with pytest.raises(SourceError, match=message):
        shard.run(params.shard, Paths(tmp_path / "project"))
    assert not (tmp_path / "project" / "data").exists()


def test_a_pattern_that_matches_nothing_fails_before_any_work(tmp_path):
    params = _config({"source": f"webdataset:{tmp_path}/*.tar"})
    with pytest.raises(SourceError, match="no input shards match"):
        shard.run(params.shard, Paths(tmp_path / "project"))
