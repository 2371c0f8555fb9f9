"""What vqpipe 0.1.0 wrote still loads: tokenizer and prior exports, token parts and training
checkpoints, made by that version's code (tests/fixtures/make_v0_1_0.py) before the restructure
renamed workers, levels and sampling settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from components.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
from components.config import parse_params
from components.data import shapes
from components.data import tokens as token_io
from components.priors import Sampler, load_prior
from components.tokenizers import Tokenizer
from pipelines import shard, tokenize, train_prior, train_tokenizer
from pipelines.lm_export import export_lm
from pipelines.runtime import Paths
from tests.lm_checks import assert_round_trip

V0_1_0 = Path(__file__).parent / "fixtures" / "v0.1.0"
# The settings the fixtures were made with (make_v0_1_0.py), under today's names.
TOKENIZER = {"channels": 8, "latent_dim": 8, "downsample": 4, "batch_size": 8, "shuffle_buffer": 16}
TOKENIZER |= {"val_every": 2, "log_every": 2, "checkpoint_every": 2, "registered_model": None}
TOKENIZER |= {"quantizer": {"type": "vq", "codebook_size": 16}}
PRIOR = {"n_layer": 1, "n_head": 2, "n_embd": 16, "batch_size": 8, "warmup_steps": 1}
PRIOR |= {"val_every": 2, "log_every": 2, "checkpoint_every": 2, "registered_model": None}
SHARD = {"num_images": 48, "image_size": 16, "samples_per_shard": 24, "val_fraction": 0.25}


def _manifest(arch: str) -> dict:
    return json.loads((V0_1_0 / arch / "tokens" / "_manifest.json").read_text())


@pytest.mark.parametrize("arch, tiers", [("vqvae", ("single",)), ("vqvae2", ("top", "bottom"))])
def test_exports_and_parts_of_0_1_load_and_agree(arch, tiers):
    old = V0_1_0 / arch
    tokenizer = Tokenizer.load(old / "tokenizer")
    # The fingerprint covers config and weights: unchanged, so the old parts still belong to it.
    assert tokenizer.fingerprint == _manifest(arch)["tokenizer_fingerprint"]
    assert tokenizer.tiers == tiers
    part = old / "tokens" / "part-train-000000.parquet"
    data = token_io.read_tokens([part], fingerprint=tokenizer.fingerprint)  # `vqpipe.levels` read as tiers
    assert data.tiers == _manifest(arch)["levels"] == [tokenizer.tier_columns(t) for t in tiers]
    images = tokenizer.decode(tokenizer.unflatten(torch.from_numpy(data.tokens[:4])))
    assert images.shape == (4, 3, 16, 16)
    # The prior (its tier embedding was `level_emb`) loads against its tokenizer and samples.
    prior, meta = load_prior(old / "prior", tokenizer=tokenizer)
    assert meta["class_names"] == ["circle", "square", "triangle", "cross"]
    tokens = Sampler(prior, generator=torch.Generator().manual_seed(0)).draw(2, torch.tensor([0, 1]))
    assert tokens.shape == (2, tokenizer.num_tokens)


def test_checkpoints_of_0_1_resume_and_its_tokenizer_tokenizes_as_it_did(tmp_path, ray_cluster, monkeypatch):
    """A project of 0.1 (its shards made again: they are deterministic), its tokenizer and its
    checkpoints: tokenizing gives the tokens 0.1 wrote, and both training stages extend the old
    finished runs (4 steps) to 6 steps from where they stopped. The built-in shapes are captioned
    since 0.10; 0.1's shards were not, and a tokenizer checkpoint is tied to its shards' bytes, so
    they are made without captions: 0.1's shards again."""
    old = V0_1_0 / "vqvae"
    params = parse_params(
        {"shard": SHARD, "train_tokenizer": {**TOKENIZER, "steps": 6}, "train_prior": {**PRIOR, "steps": 6}}
    )
    paths = Paths(tmp_path)
    monkeypatch.setattr(shapes.Drawing, "caption", property(lambda drawing: None))
    shard.run(params.shard, paths)
    shutil.copytree(old / "tokenizer", paths.tokenizer)
    tokenize.run(params.tokenize, paths)
    ours = token_io.read_tokens([paths.tokens / "part-train-000000.parquet"])
    theirs = token_io.read_tokens([old / "tokens" / "part-train-000000.parquet"])
    assert ours.keys == theirs.keys and np.array_equal(ours.tokens, theirs.tokens)
    assert ours.tiers == theirs.tiers

    for stage in ("train_prior", "train_tokenizer"):
        shutil.copytree(old / "checkpoints" / stage, paths.root / "checkpoints" / stage)
    # 0.1 trained with AdamW and kept no weight average: an unfinished run of it (its checkpoint
    # marked so) is not resumed by Muon (0.12's params.yaml) nor with an average, and the message
    # names the setting to set back.
    unfinished = tmp_path / "unfinished"
    state = load_checkpoint(paths.root / "checkpoints" / "train_prior")
    save_checkpoint(unfinished, {**state, "complete": False})
    for changed in ({"optimizer": "muon"}, {"weight_ema_decay": 0.99}):
        other = params.train_prior.model_copy(update={**changed, "checkpoint_dir": str(unfinished)})
        with pytest.raises(CheckpointMismatch, match=next(iter(changed))):
            train_prior.run(other, paths)
    # The prior's checkpoint says `workers: 1` (now ddp_workers) and holds `level_emb`.
    prior = train_prior.run(params.train_prior, paths)
    assert prior.metrics["resumed_from_step"] == 4 and prior.metrics["steps"] == 6
    tokenizer = train_tokenizer.run(params.train_tokenizer, paths)
    assert tokenizer.metrics["resumed_from_step"] == 4 and tokenizer.metrics["steps"] == 6


@pytest.mark.parametrize("arch", ["vqvae", "vqvae2"])
def test_parts_of_0_1_export_for_a_language_model(arch, tmp_path):
    """Parts without per-column codebook sizes (before 0.10) give every column the part's size;
    manifests without lineage give the input shards' names."""
    tokens = tmp_path / "tokens"
    shutil.copytree(V0_1_0 / arch / "tokens", tokens)
    manifest = _manifest(arch)
    manifest["parts"] = [p for p in manifest["parts"] if (tokens / p["part"]).is_file()]  # the fixtures keep one
    token_io.write_manifest(tokens, manifest)
    meta = export_lm(tokens, tmp_path / "lm", "parquet", captions=True).meta
    assert meta["codebook_sizes"] == {c: 16 for tier in manifest["levels"] for c in tier}
    assert meta["lineage"]["source"].startswith("1 input shards") and meta["lineage"]["shard_manifest_sha256"] is None
    assert meta["caption_counts"]["missing"] == 24
    assert_round_trip(tmp_path / "lm", tokens)
