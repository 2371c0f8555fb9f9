"""`train_prior.condition: text` through the stages: trained on the tiny project's captions
with two captions held out, exported, registered, resumed, sampled for prompts (stage, command,
registered pyfunc model) and evaluated for prompt consistency; what cannot work is refused."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import mlflow
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
from components.config import SamplingOptions, parse_params
from components.data import shapes
from components.data import tokens as token_io
from flows.cli import main
from pipelines import evaluate, sample, train_prior
from pipelines.runtime import Paths
from pipelines.sample import SampleRequest, draw, load_models
from tests.conftest import TINY


def _solid_captions(tokens) -> Counter:
    found = Counter()
    for part in token_io.split_parts(tokens, "train"):
        found.update(c for c in pq.read_table(part, columns=["caption"]).column("caption").to_pylist())
    return Counter({c: n for c, n in found.items() if shapes.parse_caption(c)})


def test_a_text_prior_through_train_sample_and_evaluate(tiny_project, tmp_path, mlflow_store, capsys):
    from mlflow.tracking import MlflowClient

    built, _ = tiny_project
    paths = Paths(tmp_path / "project")
    for folder in ("shards", "tokenizer", "tokens"):
        shutil.copytree(getattr(built, folder), getattr(paths, folder))
    held_out = [c for c, _ in _solid_captions(paths.tokens).most_common(2)]
    raw = {
        **TINY,
        "train_prior": {
            **TINY["train_prior"],
            "condition": "text",
            "text": {"max_caption_tokens": 48, "held_out_captions": held_out},
            "registered_model": "vqpipe-text-prior",
            "checkpoint_dir": str(tmp_path / "ckpt"),
        },
        "sample": {**TINY["sample"]},
        "evaluate": {**TINY["evaluate"], "num_samples": 16, "prompt_samples": 4, "write_npz": False},
    }
    params = parse_params(raw)
    trained = train_prior.run(params.train_prior, paths)
    meta = json.loads((paths.prior / "config.json").read_text())
    assert meta["text"]["held_out_captions"] == held_out and meta["text"]["max_caption_tokens"] == 48
    assert meta["class_names"] is None and meta["model"]["text_len"] == 48
    client = MlflowClient(mlflow_store)
    assert client.get_run(trained.run_id).data.params["model.condition"] == "text"
    (version,) = client.search_model_versions("name='vqpipe-text-prior'")
    assert version.tags["vqpipe.prior_condition"] == "text"

    # The stage's grid: a row per held-out caption.
    drawn = sample.run(params.sample, paths)
    assert drawn.images.shape[0] == len(held_out) * params.sample.num_per_class
    with_prompts = params.sample.model_copy(update={"prompts": ["a green cross on a blue background"]})
    assert sample.run(with_prompts, paths).images.shape[0] == params.sample.num_per_class

    # The command and the library: a prompt draws; a class, or no prompt, is refused by name.
    models = load_models(str(paths.prior), str(paths.tokenizer))
    request = SampleRequest(n=3, seed=0, batch_size=8, prompt="a green cross on a blue background")
    assert draw(models, request).tokens.shape == (3, models.tokenizer.num_tokens)
    with pytest.raises(ValueError, match="--prompt TEXT, not --class"):
        draw(models, SampleRequest(n=3, seed=0, batch_size=8, prompt="x", class_=1))
    with pytest.raises(ValueError, match="give --prompt TEXT"):
        draw(models, SampleRequest(n=3, seed=0, batch_size=8))
    with pytest.raises(ValueError, match="class-conditional: use --class"):
        draw(load_models(str(built.prior), str(built.tokenizer)), request)
    out = tmp_path / "prompt.png"
    flags = ["--n", "4", "--prompt", "a red circle on a white background", "--prior", str(paths.prior)]
    assert main(["--repo", str(paths.root), "sample", *flags, "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    assert "4 samples of 'a red circle on a white background'" in capsys.readouterr().out

    # The registered model samples a DataFrame of prompts.
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/vqpipe-text-prior/{version.version}")
    tokens = model.predict(pd.DataFrame({"prompt": ["a red circle on a white background", None]}), params={"seed": 1})
    assert tokens.shape == (2, models.tokenizer.num_tokens)

    # evaluate: generation metrics for the validation captions, prompt consistency for the held-out ones.
    metrics = evaluate.run(params.evaluate, paths).metrics
    assert metrics["prompts_evaluated"] == len(held_out)
    for name in ("prompt_shape_consistency", "prompt_colour_consistency", "prompt_consistency", "class_consistency"):
        assert 0.0 <= metrics[name] <= 1.0, name
    both = min(metrics["prompt_shape_consistency"], metrics["prompt_colour_consistency"])
    assert metrics["prompt_consistency"] <= both
    rows = json.loads((paths.eval / "prompts.json").read_text())
    assert sorted(rows) == sorted(held_out) and all(r["samples"] == 4 for r in rows.values())
    assert Image.open(paths.eval / "prompts.png").size[1] >= len(held_out) * 16
    alone = evaluate.run(params.evaluate.model_copy(update={"num_samples": 0}), paths).metrics
    assert "fid" not in alone and "prompt_shape_consistency" in alone  # the judge trained for the prompts alone

    # It resumes (more steps); other held-out captions are other training: never resumed from
    # this checkpoint (a finished one starts over, an unfinished one is refused naming `text`).
    longer = params.train_prior.model_copy(update={"steps": 10, "checkpoint_every": 5})
    assert train_prior.run(longer, paths).metrics["resumed_from_step"] == 8
    other = longer.model_copy(update={"text": longer.text.model_copy(update={"held_out_captions": held_out[:1]})})
    assert train_prior.run(other.model_copy(update={"steps": 12}), paths).metrics["resumed_from_step"] == 0
    state = load_checkpoint(tmp_path / "ckpt")
    state["complete"], state["step"] = False, 5  # as if killed at step 5
    save_checkpoint(tmp_path / "ckpt", state)
    with pytest.raises(CheckpointMismatch, match="text.held_out_captions: "):
        train_prior.run(params.train_prior.model_copy(update={"steps": 12}), paths)

    # A text prior without held-out captions or prompts: the stage draws unconditionally (the
    # empty caption, guided or not).
    meta = json.loads((paths.prior / "config.json").read_text())
    meta["text"]["held_out_captions"] = []
    (paths.prior / "config.json").write_text(json.dumps(meta))
    guided = params.sample.model_copy(update={"num_images": 4, "sampling": SamplingOptions(guidance_scale=3.0)})
    assert sample.run(guided, paths).images.shape[0] == 4


def test_text_conditioning_is_refused_where_it_cannot_work(tiny_project, tmp_path):
    built, _ = tiny_project
    with pytest.raises(ValueError, match="condition text needs kind ar"):
        parse_params({**TINY, "train_prior": {**TINY["train_prior"], "condition": "text", "kind": "maskgit"}})
    with pytest.raises(ValueError, match="lists a caption twice"):
        parse_params({**TINY, "train_prior": {**TINY["train_prior"], "text": {"held_out_captions": ["a", "a"]}}})
    # Token parts without captions: named, before any training.
    paths = Paths(tmp_path)
    shutil.copytree(built.tokenizer, paths.tokenizer)
    shutil.copytree(built.tokens, paths.tokens)
    for part in paths.tokens.rglob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["caption"]), part)
    cfg = parse_params({**TINY, "train_prior": {**TINY["train_prior"], "condition": "text"}}).train_prior
    cfg = cfg.model_copy(update={"checkpoint_dir": str(tmp_path / "ckpt"), "registered_model": None})
    with pytest.raises(ValueError, match="hold no captions: shard a captioned source"):
        train_prior.run(cfg, paths)
    assert not paths.prior.exists()


def test_condition_none_ignores_the_labels(tiny_project, tmp_path):
    from components.priors import load_prior

    built, _ = tiny_project
    paths = Paths(tmp_path)
    shutil.copytree(built.tokenizer, paths.tokenizer)
    shutil.copytree(built.tokens, paths.tokens)
    cfg = parse_params({**TINY, "train_prior": {**TINY["train_prior"], "condition": "none", "steps": 2}}).train_prior
    train_prior.run(cfg.model_copy(update={"checkpoint_dir": str(tmp_path / "ckpt"), "registered_model": None}), paths)
    prior, meta = load_prior(paths.prior)
    assert prior.conditioning == "none" and prior.num_classes == 0 and meta["class_names"] is None
