"""VQ-VAE-2 and VQ-GAN through the pipeline, kill-and-resume, and two Ray Train workers."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from components.checkpoint import CheckpointMismatch, load_checkpoint
from components.config import parse_params
from components.data import tokens as token_io
from components.tokenizers import Tokenizer
from pipelines import evaluate, sample, tokenize, train_prior, train_tokenizer
from pipelines.lm_export import export_lm
from pipelines.runtime import Paths
from tests.components.test_architectures import _lpips_file
from tests.conftest import TINY
from tests.lm_checks import assert_round_trip, flattened

ARCHS = {
    "vqvae2": (
        {"arch": "vqvae2", "vqvae2": {"top_downsample": 2, "top_quantizer": {"type": "fsq", "levels": [3, 3]}}},
        {"tokens_top": [2, 2], "tokens_bottom": [4, 4]},
    ),
    # taming-transformers' / LlamaGen's network with LlamaGen-style cosine codes learned by
    # gradient, and the whole recipe: warmup and cosine, clipping, weight EMA, accumulation.
    "taming": (
        {
            "arch": "vqgan",
            "network": "taming",
            "num_res_blocks": 1,
            "latent_dim": 4,
            "taming": {"z_channels": 8, "norm_groups": 8},
            "quantizer": {"type": "vq", "codebook_size": 16, "ema": False, "cosine": True, "kmeans_iters": 0},
            "vqgan": {"disc_start": 2, "disc_channels": 8, "disc_layers": 2},
            "lr_schedule": "cosine",
            "warmup_steps": 1,
            "grad_clip": 1.0,
            "weight_ema_decay": 0.9,
            "grad_accum_steps": 2,
        },
        {"tokens": [4, 4]},
    ),
    "vqgan": (
        {
            "arch": "vqgan",
            "recon_loss": "l1",
            "perceptual_weight": 0.1,
            "vqgan": {
                "disc_start": 2,
                "disc_channels": 8,
                "disc_layers": 2,
                "disc_loss": "non_saturating",
                "lecam_weight": 0.01,
            },
        },
        {"tokens": [4, 4]},
    ),
}


def _params(tmp_path, **tokenizer):
    raw = {
        **TINY,
        "train_tokenizer": {
            **TINY["train_tokenizer"],
            "steps": 4,
            "val_every": 4,
            "checkpoint_dir": str(tmp_path / "ckpt"),
            **tokenizer,
        },
        "train_prior": {**TINY["train_prior"], "steps": 2, "val_every": 2},
        "sample": {"num_per_class": 1, "batch_size": 4},
    }
    return raw, parse_params(raw)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pipeline_with_each_architecture(arch, tiny_project, tmp_path, mlflow_store):
    options, grids = ARCHS[arch]
    if options.get("perceptual_weight"):
        _lpips_file(tmp_path / "lpips.safetensors", "lpips")
        options = {**options, "perceptual_weights": str(tmp_path / "lpips.safetensors")}
    _, params = _params(tmp_path, **options)
    built, _ = tiny_project
    paths = Paths(tmp_path)
    shutil.copytree(built.shards, paths.shards)

    result = train_tokenizer.run(params.train_tokenizer, paths)
    tok = Tokenizer.load(paths.tokenizer)
    assert tok.config["arch"] == options["arch"] and tok.token_columns == list(grids)

    tokenized = tokenize.run(params.tokenize, paths)
    assert tokenized.manifest["grid"] == grids
    part = tokenized.manifest["parts"][0]
    table = pq.read_table(paths.tokens / part["part"])
    for name, (h, w) in grids.items():
        assert len(table.column(name)[0]) == h * w
    val = token_io.read_tokens(token_io.split_parts(paths.tokens, "val"), fingerprint=tok.fingerprint)
    assert val.tiers == [[c] for c in grids] and val.tokens.shape[1] == tok.num_tokens
    assert val.column(list(grids)[0]).max() < tok.column_codebook_sizes[list(grids)[0]]
    # The LM export: a range of ids per tier (its own codebook size), a separator before the
    # second, read back to the same tokens and the same images.
    exported = export_lm(paths.tokens, tmp_path / "lm", "bin", captions=True).meta
    assert exported["codebook_sizes"] == tok.column_codebook_sizes
    assert list(exported["special_tokens"]) == ["boi", "eoi", *(f"sep_{c}" for c in list(grids)[1:]), "pad"]
    back = assert_round_trip(tmp_path / "lm", paths.tokens)
    assert np.array_equal(flattened(back["val"], val.tiers), val.tokens)

    train_prior.run(params.train_prior, paths)
    drawn = sample.run(params.sample, paths)  # decoding checks every tier's range
    assert drawn.images.shape == (4, 3, 16, 16)
    metrics = evaluate.run(params.evaluate, paths).metrics
    assert 0 < metrics["codebook_usage"] <= 100

    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_store).get_run(result.run_id)
    assert {"loss", "recon_loss", "codebook_usage", "perplexity", "lr", "val_psnr", "val_ssim"} <= set(run.data.metrics)
    if arch == "vqgan":
        assert {"g_loss", "d_loss", "adaptive_weight", "lecam_penalty", "perceptual_loss", "lr_disc"} <= set(
            run.data.metrics
        )
        assert run.data.params["train_tokenizer.vqgan.disc_start"] == "2"
    elif arch == "taming":
        assert {"g_loss", "d_loss", "grad_norm"} <= set(run.data.metrics)
        assert tok.config["network"] == "taming" and tok.config["taming"]["ch_mult"] == [1, 2, 4]
        assert int(run.data.params["model.parameters"]) == sum(p.numel() for p in tok.model.parameters())
    else:
        assert {"codebook_usage_top", "codebook_usage_bottom"} <= set(run.data.metrics)


def _tokenizer_state(root):
    return Tokenizer.load(Paths(root).tokenizer).model.state_dict()


def _kill_at_first_checkpoint(module: str, cwd, ckpt_dir) -> dict:
    """Run the stage `module` in `cwd`, SIGKILL it (its whole process group: the stage and its
    loader processes, like a lost machine) as soon as its first checkpoint exists; that checkpoint."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=cwd,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (ckpt_dir / "checkpoint.pt").is_file():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    return load_checkpoint(ckpt_dir)


# The recipe's state (weight EMA, accumulated codebook statistics, the schedule's position) resumes too.
RECIPE = {
    "lr_schedule": "cosine",
    "warmup_steps": 5,
    "grad_clip": 0.5,
    "weight_ema_decay": 0.95,
    "grad_accum_steps": 2,
    "precision": "fp32",
}


@pytest.mark.parametrize("recipe", [{}, RECIPE], ids=["constant", "recipe"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(recipe, tiny_project, tmp_path):
    built, _ = tiny_project
    tokenizer = {
        "arch": "vqgan",
        "steps": 24,
        "checkpoint_every": 3,
        "loader_workers": 2,
        "val_every": 12,
        "log_every": 4,
        "vqgan": {"disc_start": 4, "disc_channels": 8, "disc_layers": 2, "lecam_weight": 0.01},
        "checkpoint_dir": "checkpoints/train_tokenizer",
        **recipe,
    }
    raw, params = _params(tmp_path, **tokenizer)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    for root in (killed, straight):
        shutil.copytree(built.shards, Paths(root).shards)
    (killed / "params.yaml").write_text(yaml.safe_dump(raw))
    ckpt_dir = killed / "checkpoints" / "train_tokenizer"

    state = _kill_at_first_checkpoint("pipelines.train_tokenizer", killed, ckpt_dir)
    assert 3 <= state["step"] < 24 and not state["complete"]
    assert not Paths(killed).tokenizer.exists()

    # Another setting for the unfinished run: refused, naming what differs; nothing is lost.
    changed = params.train_tokenizer.model_copy(update={"lr": 1e-3})
    with pytest.raises(CheckpointMismatch, match=r"lr: 0.002 -> 0.001"):
        train_tokenizer.run(changed, Paths(killed))
    assert load_checkpoint(ckpt_dir)["step"] == state["step"]

    # Worker counts are speed knobs: killed with 2 loader processes, resumed with 3, against a
    # straight run decoding in its own process, the weights agree.
    resumed = train_tokenizer.run(params.train_tokenizer.model_copy(update={"loader_workers": 3}), Paths(killed))
    assert resumed.metrics["resumed_from_step"] == state["step"]
    assert load_checkpoint(ckpt_dir)["complete"] and load_checkpoint(ckpt_dir)["step"] == 24
    fresh = train_tokenizer.run(params.train_tokenizer.model_copy(update={"loader_workers": 0}), Paths(straight))
    assert fresh.metrics["resumed_from_step"] == 0

    a, b = _tokenizer_state(killed), _tokenizer_state(straight)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-4, atol=1e-5), name
    # The finished run is the result of these settings and this code: a run that wants the same
    # steps (a retried stage) exports it again, training nothing. Other steps start over.
    again = train_tokenizer.run(params.train_tokenizer, Paths(killed))
    assert again.metrics["resumed_from_step"] == 24 and again.metrics["steps_per_second"] is None
    assert torch.equal(_tokenizer_state(killed)["encoder.net.0.weight"], a["encoder.net.0.weight"])
    fewer = train_tokenizer.run(params.train_tokenizer.model_copy(update={"steps": 2}), Paths(killed))
    assert fewer.metrics["resumed_from_step"] == 0


def test_two_ray_train_workers_train_one_run_with_identical_replicas(tiny_project, tmp_path, mlflow_store, ray_cluster):
    from mlflow.tracking import MlflowClient

    built, _ = tiny_project
    # VQ-GAN: DDP with two optimizers, the adaptive weight and LeCAM's averages across replicas.
    _, params = _params(
        tmp_path,
        ddp_workers=2,
        steps=6,
        checkpoint_every=3,
        log_every=1,
        use_gpu=False,
        precision="fp32",  # bf16 sums a batch's gradients in other orders, to bf16's precision
        arch="vqgan",
        vqgan={"disc_start": 2, "disc_channels": 8, "disc_layers": 2, "lecam_weight": 0.01},
    )
    paths = Paths(tmp_path)
    shutil.copytree(built.shards, paths.shards)
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("vqpipe")

    def stage_runs():
        return client.search_runs(
            [experiment.experiment_id], "tags.`vqpipe.stage` = 'train_tokenizer'", max_results=1000
        )

    before = len(stage_runs())

    result = train_tokenizer.run(params.train_tokenizer, paths)
    assert result.metrics["workers"] == 2 and result.metrics["replicas_identical"] is True
    assert len(stage_runs()) == before + 1
    history = client.get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 7))  # logged once per step: by rank 0 only
    run = client.get_run(result.run_id)
    assert run.data.params["train.world_size"] == "2" and "d_loss" in run.data.metrics
    tok = Tokenizer.load(paths.tokenizer)
    assert tok.encode(torch.rand(2, 3, 16, 16)).shape == (2, 4, 4)
    assert load_checkpoint(params.train_tokenizer.checkpoint_dir)["step"] == 6

    # One process trains the same tokenizer (k-means init, restarts, the adaptive weight included):
    # the same tokens and reconstructions. Compared by what it computes: a bias a GroupNorm
    # cancels has a zero gradient but for rounding, which Adam turns into steps of lr.
    one = tmp_path / "one"
    shutil.copytree(built.shards, Paths(one).shards)
    alone = params.train_tokenizer.model_copy(update={"ddp_workers": 1, "checkpoint_dir": str(one / "ckpt")})
    train_tokenizer.run(alone, Paths(one))
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    single = Tokenizer.load(Paths(one).tokenizer)
    assert torch.equal(tok.encode(images), single.encode(images))
    assert torch.allclose(tok.reconstruct(images), single.reconstruct(images), atol=1e-4)


def test_compiled_training_keeps_checkpoint_and_export_names(tiny_project, tmp_path):
    built, _ = tiny_project
    _, params = _params(
        tmp_path, compile=True, steps=3, arch="vqgan", vqgan={"disc_start": 1, "disc_channels": 8, "disc_layers": 2}
    )
    paths = Paths(tmp_path)
    shutil.copytree(built.shards, paths.shards)
    train_tokenizer.run(params.train_tokenizer, paths)
    state = load_checkpoint(params.train_tokenizer.checkpoint_dir)
    assert not any("_orig_mod" in k for k in [*state["model"], *state["disc"]])
    assert Tokenizer.load(paths.tokenizer).encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 4)


def test_a_killed_prior_run_resumes_to_the_uninterrupted_result(tiny_project, tmp_path):
    built, _ = tiny_project
    raw = {
        **TINY,
        "train_prior": {**TINY["train_prior"], "steps": 120, "checkpoint_every": 5, "val_every": 60, "log_every": 20},
    }
    params = parse_params(raw)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    for root in (killed, straight):
        shutil.copytree(built.tokens, Paths(root).tokens)
        shutil.copytree(built.tokenizer, Paths(root).tokenizer)
    (killed / "params.yaml").write_text(yaml.safe_dump(raw))
    ckpt_dir = killed / "checkpoints" / "train_prior"
    state = _kill_at_first_checkpoint("pipelines.train_prior", killed, ckpt_dir)
    assert 5 <= state["step"] < 120 and not state["complete"]

    changed = params.train_prior.model_copy(update={"lr": 1e-3})
    with pytest.raises(CheckpointMismatch, match=r"lr: 0.003 -> 0.001"):
        train_prior.run(changed, Paths(killed))
    resumed = train_prior.run(params.train_prior, Paths(killed))
    assert resumed.metrics["resumed_from_step"] == state["step"]
    fresh = train_prior.run(
        params.train_prior.model_copy(update={"checkpoint_dir": str(tmp_path / "other")}), Paths(straight)
    )
    assert fresh.metrics["resumed_from_step"] == 0
    from components.priors import load_prior

    a, b = load_prior(Paths(killed).prior)[0].state_dict(), load_prior(Paths(straight).prior)[0].state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    rows = (Paths(killed).plots / "train_prior.csv").read_text().splitlines()
    assert len(rows) == 121  # the whole loss curve, both halves


@pytest.mark.parametrize(("kind", "condition"), [("ar", "class"), ("maskgit", "class"), ("ar", "text")])
def test_the_prior_trains_on_two_ray_train_workers(kind, condition, tiny_project, tmp_path, mlflow_store, ray_cluster):
    from mlflow.tracking import MlflowClient

    from components.priors import load_prior

    built, _ = tiny_project
    raw = {
        **TINY,
        "train_prior": {
            **TINY["train_prior"],
            "kind": kind,
            "condition": condition,
            "text": {"max_caption_tokens": 40, "held_out_captions": ["a red circle on a white background"]},
            "ddp_workers": 2,
            "use_gpu": False,
            "steps": 6,
            "checkpoint_every": 3,
            "log_every": 1,
            "val_every": 3,
            "checkpoint_dir": str(tmp_path / "ckpt"),
        },
    }
    params = parse_params(raw)
    paths = Paths(tmp_path)
    shutil.copytree(built.tokens, paths.tokens)
    shutil.copytree(built.tokenizer, paths.tokenizer)
    result = train_prior.run(params.train_prior, paths)
    assert result.metrics["workers"] == 2 and result.metrics["replicas_identical"] is True
    history = MlflowClient(mlflow_store).get_metric_history(result.run_id, "train_bits_per_token")
    assert sorted(m.step for m in history) == list(range(1, 7))  # rank 0 logs, once per step
    prior, _ = load_prior(paths.prior, tokenizer=Tokenizer.load(paths.tokenizer))
    assert load_checkpoint(tmp_path / "ckpt")["step"] == 6 and len(load_checkpoint(tmp_path / "ckpt")["rng"]) == 2
    assert (paths.plots / "train_prior.csv").read_text().count("\n") == 7

    # One process trains the same prior: the same rows, classes (captions) dropped alike and
    # (MaskGIT) the same tokens hidden, in the same order.
    one = tmp_path / "one"
    shutil.copytree(built.tokens, Paths(one).tokens)
    shutil.copytree(built.tokenizer, Paths(one).tokenizer)
    alone = params.train_prior.model_copy(update={"ddp_workers": 1, "checkpoint_dir": str(one / "ckpt")})
    train_prior.run(alone, Paths(one))
    a, b = prior.state_dict(), load_prior(Paths(one).prior)[0].state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
