"""What streams instead of loading whole: the prior's token stream, metrics accumulated a batch at
a time (FID moments, blocked precision/recall over spilled features, code counts), parts written
row group by row group, and the metric history kept in a file."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components.data import tokenization
from components.data.shard_writer import clean_caption
from components.data.token_stream import TokenStream, row_groups
from components.data.tokens import PartLayout, PartRows, token_table
from components.metrics import CodeCounts, codebook_stats
from components.metrics.generation import (
    FeatureMoments,
    FeatureStore,
    frechet_distance,
    frechet_from_moments,
    precision_recall,
)


def _parts(tmp_path, sizes: list[int], group_rows: int = 5) -> list:
    """Token parts of `sizes` rows, each row's tokens [i, i + 1, i + 2, i + 3] (i its global
    index), label i % 3, written `group_rows` rows per row group."""
    paths, start = [], 0
    for n, size in enumerate(sizes):
        ids = np.arange(start, start + size)
        rows = PartRows([f"k{i}" for i in ids], {"tokens": ids[:, None] + np.arange(4)}, labels=ids % 3)
        path = tmp_path / f"part-{n}.parquet"
        pq.write_table(token_table(rows, PartLayout("f" * 64, 1 << 16, (2, 2))), path, row_group_size=group_rows)
        paths.append(path)
        start += size
    return paths


def _take(stream: TokenStream, batches: int) -> list[np.ndarray]:
    out = []
    for tokens, labels, _ in stream:
        assert torch.equal(labels, tokens[:, 0] % 3)  # labels travel with their rows
        out.append(tokens[:, 0].numpy())
        if len(out) == batches:
            return out
    return out


@pytest.mark.parametrize("sizes, lanes", [([12, 8, 10], 2), ([6], 2), ([20, 10], 1)])
def test_token_stream_gives_every_row_once_per_epoch_split_over_lanes(tmp_path, sizes, lanes):
    paths = _parts(tmp_path, sizes)
    stream = TokenStream(paths, [["tokens"]], 2, lanes=lanes, seed=3)
    orders = []
    for epoch in (0, 1):
        rows = [int(row[0]) for lane in range(lanes) for row, label, _ in stream.epoch(epoch, lane)]
        assert sorted(rows) == list(range(sum(sizes)))  # every row once, over the lanes
        orders.append(rows)
    assert orders[0] != orders[1] or len(row_groups(paths)) < 4  # each epoch its own order


def test_token_batches_depend_on_the_lanes_not_on_the_ranks(tmp_path):
    paths = _parts(tmp_path, [13, 9, 17])

    def batches(world_size, lanes=3, start=0):
        ranks = [
            _take(
                TokenStream(
                    paths,
                    [["tokens"]],
                    6,
                    lanes=lanes,
                    rank=r,
                    world_size=world_size,
                    shuffle_buffer=9,
                    seed=1,
                    start_batch=start,
                ),
                20 - start,
            )
            for r in range(world_size)
        ]
        return [np.concatenate(parts).tolist() for parts in zip(*ranks, strict=True)]

    one = batches(1)
    assert batches(2) == batches(3) == one and batches(2, start=7) == one[7:]
    assert batches(1, lanes=2) != one


def test_token_stream_resumes_at_a_batch_exactly(tmp_path):
    paths = _parts(tmp_path, [13, 9, 17])
    full = _take(TokenStream(paths, [["tokens"]], 4, lanes=2, shuffle_buffer=7, seed=1), 30)  # three epochs and more
    for start in (1, 9, 22):
        resumed = _take(
            TokenStream(paths, [["tokens"]], 4, lanes=2, shuffle_buffer=7, seed=1, start_batch=start), 30 - start
        )
        assert all(np.array_equal(a, b) for a, b in zip(full[start:], resumed, strict=True))
    other = _take(TokenStream(paths, [["tokens"]], 4, lanes=2, shuffle_buffer=7, seed=2), 30)
    assert not all(np.array_equal(a, b) for a, b in zip(full, other, strict=True))


def _dense_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, with whole distance matrices (the reference for the blocked version)."""
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    real_r = torch.cdist(r, r).kthvalue(k + 1, dim=1).values
    fake_r = torch.cdist(f, f).kthvalue(k + 1, dim=1).values
    d = torch.cdist(f, r)
    return (d <= real_r[None]).any(1).double().mean().item(), (d.T <= fake_r[None]).any(1).double().mean().item()


def test_blocked_precision_recall_over_spilled_features_equals_the_dense_definition(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(700, 6)).astype(np.float32)
    fake = (rng.normal(size=(500, 6)) + 1.0).astype(np.float32)
    expected = _dense_precision_recall(real, fake, k=3)
    assert 0.2 < expected[0] < 0.95 and 0.2 < expected[1] < 0.95  # neither trivially 0 nor 1
    stores = []
    for features in (real, fake):
        store = FeatureStore(budget_bytes=4000, directory=tmp_path)  # a few rows: spills at once
        for start in range(0, len(features), 64):
            store.add(features[start : start + 64])
        assert store.spilled and isinstance(store.array(), np.memmap)
        assert np.array_equal(store.array(), features)
        stores.append(store.array())
    assert precision_recall(*stores, k=3, block=128) == pytest.approx(expected, abs=1e-12)
    held = FeatureStore(budget_bytes=1 << 30, directory=tmp_path)
    held.add(real)
    assert not held.spilled and precision_recall(held.array(), fake, k=3) == pytest.approx(expected, abs=1e-12)


def test_fid_from_running_moments_equals_the_whole_set_formula():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3000, 5)) * [1, 2, 3, 1, 1] + 100.0  # far from the origin: no cancellation
    b = rng.normal(size=(2000, 5)) + 100.5
    moments = []
    for x in (a, b):
        m = FeatureMoments()
        for start in range(0, len(x), 256):
            m.add(x[start : start + 256])
        assert np.allclose(m.mean, x.mean(0)) and np.allclose(m.cov, np.cov(x, rowvar=False))
        moments.append(m)
    # The definition on the whole sets: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root = v @ np.diag(np.sqrt(w)) @ v.T
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
    expected -= 2 * np.sqrt(np.linalg.eigvalsh(root @ s_b @ root)).sum()
    assert frechet_from_moments(*moments) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_code_counts_over_batches_equal_the_whole_set():
    rng = np.random.default_rng(2)
    columns = {"tokens_group0": rng.integers(0, 16, (100, 4)), "tokens_group1": rng.integers(0, 5, (100, 4))}
    sizes = {"tokens_group0": 16, "tokens_group1": 1 << 22}  # one dense, one sparse
    counts = CodeCounts(sizes)
    for start in range(0, 100, 7):
        counts.add({name: t[start : start + 7] for name, t in columns.items()})
    assert counts.stats() == pytest.approx(codebook_stats(columns, sizes))
    codes, used = counts.all_columns()
    assert used.sum() == 800 and set(codes.tolist()) == set(range(16))


def test_a_part_is_written_row_group_by_row_group_with_the_same_rows(tmp_path, monkeypatch):
    from components.data.tokenization import ShardTask, tokenize_shard
    from components.tokenizers import Tokenizer
    from tests.corpus import make_corpus
    from tests.test_compatibility import V0_1_0

    tokenizer = Tokenizer.load(V0_1_0 / "vqvae" / "tokenizer")
    shard = make_corpus(tmp_path / "corpus", shards=2, per_shard=20)[0]
    whole = tokenize_shard(tokenizer, ShardTask(str(shard.path), str(tmp_path / "a"), "p.parquet"), 8, 1)
    monkeypatch.setattr(tokenization, "ROW_GROUP_ROWS", 6)
    grouped = tokenize_shard(tokenizer, ShardTask(str(shard.path), str(tmp_path / "b"), "p.parquet"), 4, 1)
    assert (whole.rows, whole.rejects) == (grouped.rows, grouped.rejects) and whole.rows == len(shard.good)
    a, b = pq.ParquetFile(tmp_path / "a" / "p.parquet"), pq.ParquetFile(tmp_path / "b" / "p.parquet")
    # Spooled once 6 rows wait: batches of 4 make row groups of 8.
    assert a.metadata.num_row_groups == 1 and b.metadata.num_row_groups == -(-whole.rows // 8) > 1
    assert a.read().equals(b.read())
    assert a.schema_arrow.metadata == b.schema_arrow.metadata  # the source and fingerprint too
    assert set(a.schema_arrow.names) >= {"caption", "meta", "label"} and "cls" not in a.schema_arrow.names


def test_captions_are_decoded_replaced_and_cut():
    assert clean_caption(b"plain", 10) == ("plain", [])
    assert clean_caption(b"caf\xe9", 10) == ("caf\ufffd", ["invalid_utf8"])
    assert clean_caption("x" * 12, 10) == ("x" * 10, ["truncated"])
    assert clean_caption(b"\xff" + b"y" * 20, 5) == ("\ufffdyyyy", ["invalid_utf8", "truncated"])


def test_metric_history_lives_in_a_file_cut_back_to_a_checkpoints_length(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import MetricLogger

    client = MlflowClient()
    experiment = client.get_experiment_by_name("history-test") or client.get_experiment(
        client.create_experiment("history-test")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    history = tmp_path / "history.jsonl"
    metrics = MetricLogger(run_id, history, flush_every=1000)
    metrics.resume(0)
    for step in range(1, 11):
        metrics.log(step, {"loss": 1.0 / step})
        if step % 5 == 0:
            metrics.log(step, {"val": float(step)})
    metrics.flush()
    assert metrics.rows == 12 and len(history.read_text().splitlines()) == 12
    at_checkpoint = 7  # steps 1-5 and their validation, then step 6
    again = MetricLogger(run_id, history)
    again.resume(at_checkpoint)
    assert again.last("loss") == pytest.approx(1 / 6) and again.last("val") == 5.0
    assert len(history.read_text().splitlines()) == 7
    again.log(7, {"loss": 0.5})
    again.write_csv(tmp_path / "plot.csv", ["loss", "val"])
    rows = (tmp_path / "plot.csv").read_text().splitlines()
    assert rows[0] == "step,loss,val" and rows[5] == "5,0.2,5" and rows[-1] == "7,0.5,"
    legacy = MetricLogger(run_id, tmp_path / "old.jsonl")
    legacy.resume(0, legacy=[{"step": 1, "loss": 2.0}])  # a vqpipe 0.2 checkpoint's own history
    assert legacy.rows == 1 and json.loads((tmp_path / "old.jsonl").read_text()) == {"step": 1, "loss": 2.0}
