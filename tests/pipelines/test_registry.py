"""The model registry against a real MLflow tracking server: the training stages log pyfunc
models (models-from-code) and register them, evaluate moves @champion, a finished stage retried
neither retrains nor registers again."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from components.config import parse_params
from components.data.shards import split_batches
from components.tokenizers import Tokenizer
from pipelines import registry, tokenize, train_prior, train_tokenizer
from pipelines.evaluate import evaluate_and_promote
from pipelines.runtime import Paths
from tests.conftest import TINY


@pytest.fixture
def on_the_server(mlflow_server, monkeypatch):
    """This test's MLflow calls, and its stages', go to the session's MLflow server; the
    session's store is back for the tests after it."""
    import mlflow

    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(before)


@pytest.mark.timeout(600)
def test_a_pipeline_against_an_mlflow_server_registers_pyfunc_models_and_promotes(
    tiny_project, tmp_path, on_the_server, ray_cluster
):
    import mlflow
    from mlflow.tracking import MlflowClient

    built, _ = tiny_project
    mlflow_server = on_the_server
    params = parse_params(
        {**TINY, "train_tokenizer": {**TINY["train_tokenizer"], "checkpoint_dir": str(tmp_path / "ckpt-tok")}}
    )
    paths = Paths(tmp_path / "project")
    shutil.copytree(built.shards, paths.shards)
    trained = train_tokenizer.run(params.train_tokenizer, paths)
    tokenize.run(params.tokenize, paths)
    prior_run = train_prior.run(
        params.train_prior.model_copy(update={"checkpoint_dir": str(tmp_path / "ckpt-prior")}), paths
    )
    evaluated = evaluate_and_promote(params, paths)

    # Runs, artifacts and versions, read back from the server.
    client = MlflowClient(mlflow_server)
    assert client.get_run(evaluated.run_id).data.metrics["psnr"] == pytest.approx(evaluated.metrics["psnr"])
    assert {a.path for a in client.list_artifacts(trained.run_id, "tokenizer")} == {
        "tokenizer/config.json",
        "tokenizer/model.safetensors",
    }
    (tok_version,) = client.search_model_versions("name='vqpipe-tokenizer'")
    assert tok_version.run_id == trained.run_id
    champion = client.get_model_version_by_alias("vqpipe-tokenizer", "champion")
    assert champion.version == tok_version.version and champion.tags["vqpipe.promotion"].startswith("champion: first")
    prior_champion = client.get_model_version_by_alias("vqpipe-prior", "champion")
    assert prior_champion.run_id == prior_run.run_id

    # The registered models load as pyfunc models (their code, not a pickle) and predict.
    tokenizer = Tokenizer.load(paths.tokenizer)
    raw, _, _ = next(split_batches(paths.shards, "val", 6))
    model = mlflow.pyfunc.load_model("models:/vqpipe-tokenizer@champion")
    tokens = model.predict(raw.permute(0, 2, 3, 1).numpy())  # uint8 (n, H, W, 3), as images come
    assert np.array_equal(tokens, tokenizer.encode(raw.float() / 255).numpy())
    prior = mlflow.pyfunc.load_model("models:/vqpipe-prior@champion")
    rows = pd.DataFrame({"class": [0, "square", None]})
    drawn = prior.predict(rows, params={"output": "tokens", "seed": 3, "temperature": 0.9})
    assert drawn.shape == (3, tokenizer.num_tokens) and drawn.dtype == np.int64
    assert np.array_equal(drawn, prior.predict(rows, params={"output": "tokens", "seed": 3, "temperature": 0.9}))
    images = prior.predict(rows, params={"output": "images", "seed": 3})
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="no class named 'hexagon'"):
        prior.predict(pd.DataFrame({"class": ["hexagon"]}))

    # Retried after it finished: no training (it resumes at its last step), no second version.
    before = (paths.tokenizer / "model.safetensors").read_bytes()
    again = train_tokenizer.run(params.train_tokenizer, paths)
    assert again.metrics["resumed_from_step"] == params.train_tokenizer.steps
    assert again.metrics["steps_per_second"] is None  # not a step trained
    assert (paths.tokenizer / "model.safetensors").read_bytes() == before
    assert len(client.search_model_versions("name='vqpipe-tokenizer'")) == 1

    # A worse tokenizer (2 steps) becomes the challenger, saying why; measured on other images
    # (a capped split), the champion is measured again on those before they are compared.
    worse = Paths(tmp_path / "worse")
    shutil.copytree(built.shards, worse.shards)
    short = params.train_tokenizer.model_copy(update={"steps": 2, "checkpoint_dir": str(tmp_path / "ckpt-worse")})
    train_tokenizer.run(short, worse)
    alone = params.model_copy(update={"train_prior": params.train_prior.model_copy(update={"registered_model": None})})
    for cap in (None, 10):
        measured = registry.image_metric(str(worse.tokenizer), worse.shards, "psnr", cap, 64, worse.root)
        val_images = sum(len(b[0]) for b in split_batches(worse.shards, "val", 64, limit=cap))
        metrics = {"psnr": measured, "val_images": val_images}
        capped = alone.model_copy(update={"evaluate": alone.evaluate.model_copy(update={"max_images": cap})})
        alias, reason = registry.promote_models(capped, worse, metrics)["tokenizer"]
        assert alias == "challenger" and f"<= champion v{champion.version}'s" in reason, reason
    champion_on_ten = client.get_model_version(  # its figure on the capped split, kept for next time
        "vqpipe-tokenizer", champion.version
    ).tags["vqpipe.eval.psnr"]
    expected = registry.image_metric(str(paths.tokenizer), paths.shards, "psnr", 10, 64, paths.root)
    assert float(champion_on_ten) == pytest.approx(expected, rel=1e-5)
    assert client.get_model_version_by_alias("vqpipe-tokenizer", "champion").version == champion.version

    # A MaskGIT prior on the same tokens: registered with its kind, it never displaces an AR
    # champion (bits per hidden token are not bits per token), and its pyfunc model decodes in
    # the steps it is asked for.
    masked = Paths(tmp_path / "maskgit")
    for folder in ("shards", "tokenizer", "tokens"):
        shutil.copytree(getattr(paths, folder), getattr(masked, folder))
    maskgit_cfg = params.train_prior.model_copy(update={"kind": "maskgit", "checkpoint_dir": str(tmp_path / "ckpt-mg")})
    maskgit_run = train_prior.run(maskgit_cfg, masked)
    evaluate_and_promote(params.model_copy(update={"train_prior": maskgit_cfg}), masked)
    (version,) = [v for v in client.search_model_versions("name='vqpipe-prior'") if v.run_id == maskgit_run.run_id]
    assert version.tags["vqpipe.prior_kind"] == "maskgit"
    assert client.get_model_version_by_alias("vqpipe-prior", "champion").version == prior_champion.version
    reason = client.get_model_version("vqpipe-prior", version.version).tags["vqpipe.promotion"]
    assert reason.startswith("challenger: the champion is an AR prior and this a MaskGIT one"), reason
    masked_model = mlflow.pyfunc.load_model(f"models:/vqpipe-prior/{version.version}")
    drawn = masked_model.predict(rows, params={"seed": 1, "decode_steps": 3, "guidance_scale": 2.0})
    assert drawn.shape == (3, tokenizer.num_tokens) and drawn.min() >= 0 and drawn.max() < tokenizer.codebook_size
