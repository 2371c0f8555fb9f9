"""One smoke test per stage: the six stages run once on a tiny config (the `tiny_project`
fixture); each test reads back what its stage wrote and logged."""

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components.data import shapes
from components.data import tokens as token_io
from components.data.shards import load_split, read_manifest, split_batches
from components.priors import load_prior
from components.tokenizers import Tokenizer


def _stage_runs(stage):
    return mlflow.search_runs(experiment_names=["vqpipe"], filter_string=f"tags.`vqpipe.stage` = '{stage}'")


def test_shard(tiny_project):
    paths, results = tiny_project
    manifest = read_manifest(paths.shards)
    assert manifest["inputs"] == 160 and manifest["rejected"] == 0
    assert manifest["samples"]["train"] + manifest["samples"]["val"] == 160
    assert manifest["classes"] == ["circle", "square", "triangle", "cross"]
    assert sorted(p.name for p in paths.shards.glob("*.tar")) == sorted(s["name"] for s in manifest["shards"])
    assert len(_stage_runs("shard")) >= 1


def test_train_tokenizer(tiny_project):
    paths, results = tiny_project
    tok = Tokenizer.load(paths.tokenizer)
    assert tok.fingerprint == results["train_tokenizer"].fingerprint
    images = load_split(paths.shards, "val", limit=4)[0].float() / 255
    assert tok.encode(images).shape == (4, 4, 4)
    metrics = json.loads((paths.metrics / "train_tokenizer.json").read_text())
    assert metrics["steps"] == 8 and np.isfinite(metrics["val_psnr"])
    assert (paths.plots / "train_tokenizer.csv").read_text().startswith("step,loss,recon_loss,codebook_usage")
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(results["train_tokenizer"].run_id)
    assert run.data.tags["vqpipe.stage"] == "train_tokenizer"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 9))  # every step logged
    assert run.data.tags["vqpipe.tokenizer_fingerprint"] == tok.fingerprint
    assert run.data.params["train_tokenizer.quantizer.codebook_size"] == "16"  # the type's options, not only its name


def test_tokenize(tiny_project):
    paths, results = tiny_project
    manifest = token_io.read_manifest(paths.tokens)
    shards = read_manifest(paths.shards)
    assert len(manifest["parts"]) == len(shards["shards"])
    assert {split: manifest["splits"][split]["rows"] for split in ("train", "val")} == shards["samples"]
    assert manifest["rows"] + manifest["rejected"] == manifest["samples"] == 160 and manifest["complete"]
    tok = Tokenizer.load(paths.tokenizer)
    for part in manifest["parts"]:
        table = pq.read_table(paths.tokens / part["part"])
        assert table.num_rows == part["rows"] == part["samples"]
        assert table.schema.metadata[b"vqpipe.tokenizer_fingerprint"].decode() == tok.fingerprint
    assert not list(paths.tokens.glob(".*tmp"))
    # Tokens in the shards are what the tokenizer gives for the shard images.
    val = token_io.read_tokens(token_io.split_parts(paths.tokens, "val"), fingerprint=tok.fingerprint)
    images, labels, keys = load_split(paths.shards, "val")
    order = [keys.index(k) for k in val.keys]
    expected = tok.encode(images[order].float() / 255).reshape(len(order), -1).numpy()
    assert np.array_equal(val.tokens, expected)
    assert np.array_equal(val.labels, labels[order].numpy())
    # The shards' json (source and class name) travels with the tokens, readable with pandas.
    df = pd.read_parquet(paths.tokens / manifest["parts"][0]["part"])
    meta = json.loads(df["meta"].iloc[0])
    assert meta["class_name"] in {"circle", "square", "triangle", "cross"}
    # The built-in shapes' captions say what is drawn, and come through with the tokens.
    index = int(df["key"].iloc[0].removeprefix("shapes-"))
    assert df["caption"].iloc[0] == shapes.draw(index).caption
    assert df["caption"].iloc[0].split(" ")[2] == meta["class_name"]


def test_train_prior(tiny_project):
    paths, results = tiny_project
    tok = Tokenizer.load(paths.tokenizer)
    prior, meta = load_prior(paths.prior, tokenizer=tok)
    assert prior.cfg.num_classes == 4 and prior.cfg.vocab_size == 16 and prior.cfg.seq_len == 16
    metrics = results["train_prior"].metrics
    assert np.isfinite(metrics["val_bits_per_token"]) and metrics["val_bits_per_token"] > 0
    history = mlflow.tracking.MlflowClient().get_metric_history(results["train_prior"].run_id, "val_bits_per_token")
    assert [m.step for m in history] == [4, 8]


def test_train_prior_refuses_tokens_of_another_tokenizer(tiny_project, tiny_params, tmp_path):
    import shutil

    from pipelines import train_prior
    from pipelines.runtime import Paths

    paths, _ = tiny_project
    other = Paths(tmp_path)
    shutil.copytree(paths.tokens, other.tokens)
    tok = Tokenizer.load(paths.tokenizer)
    with torch.no_grad():
        tok.model.decoder.net[0].weight.add_(1.0)
    Tokenizer(tok.model, tok.config).save(other.tokenizer)
    with pytest.raises(token_io.TokenShardMismatch, match="re-tokenize"):
        train_prior.run(tiny_params.train_prior, other)


def test_sample(tiny_project):
    paths, results = tiny_project
    result = results["sample"]
    assert result.images.shape == (8, 3, 16, 16)
    assert result.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    grid = Image.open(paths.samples / "grid.png")
    # 4 rows (one per class) of 2 images, 2x upscaled, 2-pixel padding.
    assert grid.size == (2 * (2 + 2 * 18), 2 * (2 + 4 * 18))
    assert len(_stage_runs("sample")) >= 1


def test_evaluate(tiny_project):
    paths, results = tiny_project
    metrics = json.loads((paths.metrics / "evaluate.json").read_text())
    assert metrics == results["evaluate"].metrics
    assert metrics["val_images"] == read_manifest(paths.shards)["samples"]["val"]
    assert 0 < metrics["codebook_usage"] <= 100 and 1 <= metrics["perplexity"] <= 16
    assert np.isfinite(metrics["psnr"]) and -1 <= metrics["ssim"] <= 1
    assert metrics["prior_bits_per_token"] > 0
    counts = (paths.plots / "codebook_usage.csv").read_text().splitlines()
    assert len(counts) == 17 and sum(int(line.split(",")[1]) for line in counts[1:]) == metrics["val_images"] * 16
    assert (paths.eval / "reconstructions.png").exists()
    # rFID over the whole split, in the seeded random Inception-v3 (no weights given), named.
    assert metrics["rfid"] > 0 and metrics["rfid_feature_space"] == "inception_v3_random_init(seed=0,input=75px)"
    assert "lpips" not in metrics  # no LPIPS weights given
    # ADM-style .npz files: uint8 NHWC arr_0; the references are the validation images as stored.
    val_images = metrics["val_images"]
    with np.load(paths.eval / "references.npz") as refs, np.load(paths.eval / "reconstructions.npz") as recs:
        assert refs["arr_0"].shape == recs["arr_0"].shape == (val_images, 16, 16, 3)
        assert refs["arr_0"].dtype == recs["arr_0"].dtype == np.uint8
        stored = np.concatenate(
            [raw.permute(0, 2, 3, 1).numpy() for raw, _, _ in split_batches(paths.shards, "val", 64)]
        )
        assert np.array_equal(refs["arr_0"], stored)
        # PSNR is measured on exactly these uint8 reconstructions.
        mse = ((recs["arr_0"].astype(np.float64) - stored) / 255.0) ** 2
        per_image = 10 * np.log10(1.0 / (mse.reshape(val_images, -1).mean(1) + 1e-10))
        assert per_image.mean() == pytest.approx(metrics["psnr"], abs=1e-3)
    with np.load(paths.eval / "samples.npz") as samples:
        assert samples["arr_0"].shape == (48, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
    # Generation metrics of 48 samples, in the tokenizer encoder's space (no Inception given).
    assert metrics["feature_space"] == "tokenizer_encoder" and metrics["generated_images"] == 48
    assert metrics["fid"] >= 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert 0 <= metrics["class_consistency"] <= 1 and 0 <= metrics["classifier_val_accuracy"] <= 1
    runs = _stage_runs("evaluate")
    logged = runs[runs.run_id == results["evaluate"].run_id].iloc[0]
    assert logged["metrics.psnr"] == pytest.approx(metrics["psnr"])
    assert (
        logged["metrics.fid"] == pytest.approx(metrics["fid"])
        and logged["tags.vqpipe.feature_space"] == "tokenizer_encoder"
    )
    assert logged["metrics.rfid"] == pytest.approx(metrics["rfid"])
    assert logged["tags.vqpipe.rfid_feature_space"] == metrics["rfid_feature_space"]


def test_evaluate_with_inception_and_lpips_weights(tiny_project, tiny_params, tmp_path):
    """Given weights files (random ones here), rFID is computed in Inception space and LPIPS
    of the reconstructions is reported."""
    from safetensors.torch import save_file

    from components.metrics.inception import FIDInceptionV3
    from pipelines import evaluate
    from pipelines.runtime import Paths
    from tests.components.test_architectures import _lpips_file

    built, _ = tiny_project
    paths = Paths(tmp_path / "project")
    for name in ("data", "models"):
        shutil.copytree(built.root / name, paths.root / name)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in FIDInceptionV3().state_dict().items()}
    save_file(state, str(tmp_path / "inception.safetensors"))
    _lpips_file(tmp_path / "lpips.safetensors", "lpips")
    cfg = tiny_params.evaluate.model_copy(
        update={
            "inception_weights": str(tmp_path / "inception.safetensors"),
            "perceptual_weights": str(tmp_path / "lpips.safetensors"),
            "max_images": 8,
            "num_samples": 0,
            "write_npz": False,
        }
    )
    metrics = evaluate.run(cfg, paths).metrics
    assert metrics["val_images"] == 8 and metrics["rfid_feature_space"] == "inception"
    assert metrics["rfid"] >= 0 and metrics["lpips"] > 0
    assert not list(paths.eval.glob("*.npz"))
