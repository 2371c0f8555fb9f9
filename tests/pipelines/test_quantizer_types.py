"""Every quantizer type through the pipeline: a few training steps, token shards, a prior and
samples, on the tiny project's shards."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components.config import parse_params
from components.data import tokens as token_io
from components.priors import load_prior
from components.tokenizers import Tokenizer
from pipelines import sample, tokenize, train_prior, train_tokenizer
from pipelines.lm_export import export_lm
from pipelines.runtime import Paths
from tests.conftest import TINY
from tests.lm_checks import assert_round_trip, flattened

QUANTIZERS = {
    "vq": ({"type": "vq", "codebook_size": 16, "ema": False, "cosine": True}, ["tokens"]),
    "gumbel": ({"type": "gumbel", "codebook_size": 16, "anneal_steps": 4}, ["tokens"]),
    "product": ({"type": "product", "codebook_size": 8, "groups": 2}, ["tokens_group0", "tokens_group1"]),
    "residual": (
        {"type": "residual", "codebook_size": 8, "stages": 3, "dropout": 0.5},
        ["tokens_stage0", "tokens_stage1", "tokens_stage2"],
    ),
    "fsq": ({"type": "fsq", "levels": [3, 3, 2]}, ["tokens"]),
    "lfq": ({"type": "lfq", "codebook_size": 16}, ["tokens"]),
}


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_pipeline_with_each_quantizer_type(kind, tiny_project, tmp_path):
    quantizer, columns = QUANTIZERS[kind]
    params = parse_params(
        {
            **TINY,
            "train_tokenizer": {**TINY["train_tokenizer"], "quantizer": quantizer, "steps": 4, "val_every": 4},
            "train_prior": {**TINY["train_prior"], "steps": 2, "val_every": 2},
            "sample": {"num_per_class": 1, "batch_size": 4},
        }
    )
    built, _ = tiny_project
    paths = Paths(tmp_path)
    shutil.copytree(built.shards, paths.shards)

    train_tokenizer.run(params.train_tokenizer, paths)
    tok = Tokenizer.load(paths.tokenizer)
    assert tok.token_columns == columns
    assert tok.config["quantizer"]["type"] == kind

    tokenized = tokenize.run(params.tokenize, paths)
    assert list(tokenized.manifest["grid"]) == columns
    for part in tokenized.manifest["parts"]:
        table = pq.read_table(paths.tokens / part["part"])
        assert table.num_rows == part["rows"] == part["samples"]
        for name in columns:
            rows = np.asarray(table.column(name).to_pylist())
            assert rows.shape == (part["rows"], 16) and rows.min() >= 0 and rows.max() < tok.codebook_size
    val = token_io.read_tokens(token_io.split_parts(paths.tokens, "val"), fingerprint=tok.fingerprint)
    assert val.tokens.shape[1] == tok.num_tokens == 16 * len(columns)
    # The shards decode back to what the tokenizer makes of the images.
    assert tok.decode(tok.unflatten(torch.from_numpy(val.tokens[:2]))).shape == (2, 3, 16, 16)
    # The LM export: a range of ids per column, a separator before each but the first; read
    # back to the same tokens.
    exported = export_lm(paths.tokens, tmp_path / "lm", "parquet").meta
    assert list(exported["special_tokens"]) == ["boi", "eoi", *(f"sep_{c}" for c in columns[1:]), "pad"]
    assert exported["image_length"] == 2 + 16 * len(columns) + len(columns) - 1
    back = assert_round_trip(tmp_path / "lm", paths.tokens)
    assert np.array_equal(flattened(back["val"], val.tiers), val.tokens)

    train_prior.run(params.train_prior, paths)
    prior, _ = load_prior(paths.prior, tokenizer=tok)
    assert prior.cfg.vocab_size == tok.codebook_size and prior.cfg.seq_len == tok.num_tokens

    drawn = sample.run(params.sample, paths)
    assert drawn.images.shape == (4, 3, 16, 16)
