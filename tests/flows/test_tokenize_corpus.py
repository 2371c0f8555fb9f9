"""`vqpipe tokenize` on a generated corpus: accounting, one process against a two-node Ray
cluster, a SIGKILL mid-way and the rerun, another tokenizer, MLflow model URIs, reading back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from components.data import tokens as token_io
from components.data.images import decode_image, to_array
from components.tokenizers import Tokenizer
from pipelines.corpus import CorpusJob, resolve_tokenizer, tokenize_corpus
from pipelines.lm_export import export_lm
from tests.corpus import make_corpus
from tests.lm_checks import assert_round_trip

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 shards (the last truncated) and a listed shard that does not exist, as an @file."""
    root = tmp_path_factory.mktemp("corpus")
    truths = make_corpus(root / "shards", shards=24)
    listing = root / "shards.txt"
    listing.write_text("".join(f"{t.path}\n" for t in truths) + f"{root / 'shards' / 'gone-00099.tar'}\n")
    return root, truths, listing


@pytest.fixture(scope="module")
def reference(corpus, tiny_project, tmp_path_factory):
    """The corpus tokenized in this process, uninterrupted."""
    root, truths, listing = corpus
    paths, _ = tiny_project
    out = tmp_path_factory.mktemp("reference")
    job = CorpusJob(
        inputs=[str(t.path) for t in truths] + [str(root / "shards" / "gone-00099.tar")],
        output=str(out),
        tokenizer=str(paths.tokenizer),
        batch_size=4,
        in_process=True,
        retry_delay=0,
    )
    return out, tokenize_corpus(job)


def _parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


def _cli_env(prefect_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PREFECT_API_URL"] = prefect_url
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run in a process group of its own, killed whole on timeout (Ray nodes included)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:3]} timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def prefect_url(prefect_api):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_counts_add_up_and_odd_images_become_rows(reference, corpus, tiny_project):
    out, result = reference
    _, truths, _ = corpus
    manifest = token_io.read_manifest(out)
    assert manifest == result.manifest and not manifest["complete"]
    by_input = {p["input_shard"]: p for p in manifest["parts"]}
    for truth in truths[:-1]:
        part = by_input[str(truth.path)]
        assert part["rows"] + part["rejected"] == part["samples"] == truth.samples
        table = pq.read_table(out / part["part"])
        assert table.column("key").to_pylist() == truth.good  # every image mode and size, in shard order
        assert {r["key"]: r["reason"] for r in part["rejects"]}.keys() == truth.bad.keys()
        for reject in part["rejects"]:
            assert truth.bad[reject["key"]] in reject["reason"]
    assert manifest["rows"] + manifest["rejected"] == manifest["samples"] == sum(t.samples for t in truths[:-1])
    assert manifest["rejected"] == sum(len(t.bad) for t in truths[:-1]) > 0
    # The truncated shard and the missing one: retried, then failed, and no part for either.
    failed = {Path(f["input_shard"]).name: f for f in manifest["failed"]}
    assert set(failed) == {truths[-1].path.name, "gone-00099.tar"}
    assert (
        "truncated tar" in failed[truths[-1].path.name]["error"]
        and "no such shard" in failed["gone-00099.tar"]["error"]
    )
    assert all(f["attempts"] == 3 for f in failed.values())
    assert len(_parts(out)) == 23 and not list(out.glob(".*"))


def test_the_batch_size_does_not_change_the_parts(reference, corpus, tmp_path, tiny_project):
    """`tokenize.batch_size` is a runtime setting: every image is encoded on its own."""
    root, truths, _ = corpus
    paths, _ = tiny_project
    out = tmp_path / "batch64"
    job = CorpusJob(
        inputs=[str(t.path) for t in truths[:6]],
        output=str(out),
        tokenizer=str(paths.tokenizer),
        batch_size=64,
        in_process=True,
        retry_delay=0,
    )
    tokenize_corpus(job)
    made = _parts(out)
    assert made and made == {name: data for name, data in _parts(reference[0]).items() if name in made}


def test_parts_read_with_pandas_and_decode_to_images(reference, corpus, tiny_project):
    out, result = reference
    paths, _ = tiny_project
    tok = Tokenizer.load(paths.tokenizer)
    _, truths, _ = corpus
    df = pd.concat([pd.read_parquet(out / p["part"]) for p in result.manifest["parts"]], ignore_index=True)
    assert list(df.columns) == ["key", "tokens", "label", "caption", "meta"]
    assert len(df) == result.manifest["rows"]
    first = df.iloc[0]
    assert first["caption"] == f"caption {first['key']} \u00e9" and json.loads(first["meta"])["n"] % 3 == first["label"]
    h, w = tok.grid
    indices = torch.from_numpy(np.stack(df["tokens"].to_numpy()).astype(np.int64)).reshape(-1, h, w)
    images = tok.decode(indices[:8])
    assert images.shape == (8, 3, tok.image_size, tok.image_size)
    # The tokens are the tokenizer's codes of the training-time preprocessing (decode, convert,
    # resize the short side, center-crop), here for a 420x300 JPEG.
    with __import__("tarfile").open(truths[0].path) as tar:
        large = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        data, key = tar.extractfile(large).read(), large.name.split(".")[0]
    row = df.index[df["key"] == key][0]
    x = torch.from_numpy(to_array(decode_image(data, tok.image_size)))[None].float() / 255
    assert np.array_equal(df["tokens"][row], tok.encode(x).reshape(-1).numpy())


def test_two_ray_nodes_give_the_same_output_as_one_process(reference, corpus, tiny_project, prefect_url, tmp_path):
    """The CLI joins a cluster of two nodes started on loopback here; both nodes take shards."""
    out_ref, _ = reference
    _, _, listing = corpus
    paths, _ = tiny_project
    out = tmp_path / "tokens"
    script = textwrap.dedent(f"""
        import os, sys
        import ray._private.utils
        from ray.cluster_utils import Cluster
        from flows.cli import main
        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
        # No "current cluster" file left for another ray.init() to find and join.
        os.remove(ray._private.utils.get_ray_address_file(None))
        cluster.add_node(num_cpus=1)
        try:
            code = main(["tokenize", "--tokenizer", {str(paths.tokenizer)!r}, "--input", "@{listing}",
                         "--output", {str(out)!r}, "--batch-size", "4", "--actors", "2", "--retries", "2",
                         "--ray-address", cluster.address])
        finally:
            cluster.shutdown()
        sys.exit(code)
    """)
    # Ray keeps every node and the driver on 127.0.0.1 when it is told this is no cluster of
    # machines (else it swaps loopback for the host's address).
    env = {**_cli_env(prefect_url), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = _run([sys.executable, "-c", script], tmp_path, env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        "2 of 25 input shards failed" in proc.stderr
        and "gone-00099.tar" in proc.stderr
        and "corpus-00023.tar" in proc.stderr
    )
    assert "on 2 Ray nodes" in proc.stdout, proc.stdout
    assert _parts(out) == _parts(out_ref)  # byte for byte
    assert token_io.read_manifest(out) == token_io.read_manifest(out_ref)


def test_killed_midway_then_rerun_gives_the_uninterrupted_output(corpus, tiny_project, prefect_url, tmp_path):
    """SIGKILL while a shard is being read (it is a pipe: that waits on a file), then rerun."""
    root, truths, _ = corpus
    paths, _ = tiny_project
    gate = tmp_path / "gate"
    blocked = f"pipe:while [ -e {gate} ]; do sleep 0.05; done; cat {truths[12].path}"
    inputs = [str(t.path) for t in truths[:12]] + [blocked] + [str(t.path) for t in truths[13:-1]]
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(inputs) + "\n")
    ref = tmp_path / "ref"
    tokenize_corpus(
        CorpusJob(inputs=inputs, output=str(ref), tokenizer=str(paths.tokenizer), batch_size=4, in_process=True)
    )

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "tokenize",
        "--tokenizer",
        str(paths.tokenizer),
        "--input",
        f"@{listing}",
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--in-process",
        "--allow-pipe",  # the listing holds a pipe: line, which runs only when allowed
    ]
    gate.touch()
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_cli_env(prefect_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while len(list(out.glob("part-*.parquet"))) < 22:  # all but the blocked shard (two shards run at once)
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "timeout"
        )
        time.sleep(0.05)
    time.sleep(0.3)  # the blocked shard is being read
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    made = _parts(out)
    assert len(made) == 22 and not (out / "_manifest.json").exists()
    for name in made:  # whatever is visible under a part's name is whole
        assert pq.read_table(out / name).num_rows == token_io.part_info(out / name).rows

    gate.unlink()
    rerun = _run(cmd, tmp_path, _cli_env(prefect_url), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 tokenized, 22 already complete, 0 failed" in rerun.stdout
    assert _parts(out) == _parts(ref)
    assert token_io.read_manifest(out) == token_io.read_manifest(ref) and token_io.read_manifest(out)["complete"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_another_tokenizer_redoes_the_parts_and_overwrite_redoes_all(reference, corpus, tiny_project, tmp_path):
    out_ref, first = reference
    root, truths, _ = corpus
    paths, _ = tiny_project
    other = Tokenizer.load(paths.tokenizer)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.01)
    other.save(tmp_path / "other")
    other = Tokenizer.load(tmp_path / "other")
    out = tmp_path / "tokens"
    shutil.copytree(out_ref, out)
    job = CorpusJob(
        inputs=[str(t.path) for t in truths[:-1]],
        output=str(out),
        tokenizer=str(tmp_path / "other"),
        batch_size=4,
        in_process=True,
    )
    result = tokenize_corpus(job)
    assert (result.tokenized, result.skipped) == (23, 0)
    assert {token_io.part_info(p).fingerprint for p in out.glob("part-*.parquet")} == {other.fingerprint}
    assert (
        token_io.read_tokens(sorted(out.glob("part-*.parquet")), fingerprint=other.fingerprint).tokens.shape[0]
        == result.manifest["rows"]
    )
    with pytest.raises(token_io.TokenShardMismatch):
        token_io.read_tokens(sorted(out.glob("part-*.parquet")), fingerprint=first.manifest["tokenizer_fingerprint"])
    again = tokenize_corpus(job)
    assert (again.tokenized, again.skipped) == (0, 23) and again.manifest == result.manifest
    job.overwrite = True
    assert tokenize_corpus(job).tokenized == 23


def test_tokenizer_from_the_mlflow_registry(tiny_project, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    from pipelines import registry

    paths, results = tiny_project
    client = MlflowClient(tracking_uri=mlflow_store)
    # The version holding this export (an identical tokenizer trained by another test shares it).
    version = registry.version_of("vqpipe-tokenizer", paths.tokenizer)
    client.set_registered_model_alias("vqpipe-tokenizer", "champion", version)
    local = resolve_tokenizer("models:/vqpipe-tokenizer@champion", tmp_path)
    assert Tokenizer.load(local).fingerprint == results["train_tokenizer"].fingerprint
    with pytest.raises(ValueError, match="cannot fetch tokenizer"):
        resolve_tokenizer("models:/vqpipe-tokenizer@nobody", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a tokenizer export"):
        resolve_tokenizer(str(tmp_path / "empty"), tmp_path)


def test_cli_bad_input_exits_2_before_any_work(tmp_path, tiny_project):
    from flows.cli import main

    paths, _ = tiny_project
    assert (
        main(["tokenize", "--tokenizer", str(tmp_path / "none"), "--input", "x.tar", "--output", str(tmp_path / "o")])
        == 2
    )
    assert not (tmp_path / "o").exists()


def test_any_fsspec_destination_and_text_classes(tiny_project, tmp_path):
    """Parts and manifest on a non-local filesystem (fsspec's in-memory one); `cls` fields that
    are names, not ids, travel as a `cls` text column."""
    import fsspec

    from tests.components.test_corpus import _tar

    paths, _ = tiny_project
    png = io_png()
    _tar(tmp_path / "named.tar", {"a.png": png, "a.cls": b"dog", "b.png": png, "b.cls": b"cat", "c.png": png})
    job = CorpusJob(
        inputs=[str(tmp_path / "named.tar")],
        output="memory://corpus-tokens",
        tokenizer=str(paths.tokenizer),
        in_process=True,
    )
    result = tokenize_corpus(job)
    assert result.manifest["rows"] == 3 and token_io.read_manifest("memory://corpus-tokens") == result.manifest
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/corpus-tokens", detail=False)) == [
        "_manifest.json",
        "part-named.parquet",
    ]
    with fs.open("/corpus-tokens/part-named.parquet", "rb") as f:
        table = pq.read_table(f)
    assert table.column("cls").to_pylist() == ["dog", "cat", None] and "label" not in table.column_names
    assert tokenize_corpus(job).skipped == 1  # resume works there too
    # `vqpipe export` reads them from there too; a corpus without splits is all `train`.
    exported = export_lm("memory://corpus-tokens", tmp_path / "lm", "bin").meta
    assert exported["splits"]["train"]["images"] == 3 and list(exported["splits"]) == ["train"]
    assert exported["lineage"]["source"].startswith("1 input shards") and exported["text_vocab_size"] == 0
    assert_round_trip(tmp_path / "lm", "memory://corpus-tokens")


def io_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_sigterm_ends_tokenize_within_seconds_with_its_commands_and_temporaries(
    corpus, tiny_project, prefect_url, tmp_path
):
    """A real SIGTERM while a pipe: shard blocks: the command exits in seconds, the pipe's
    command is gone, nothing temporary stays, the output is free, and the rerun completes."""
    from tests.test_compatibility import V0_1_0

    root, truths, _ = corpus
    tokenizer = V0_1_0 / "vqvae" / "tokenizer"  # a real one, no pipeline run needed
    gate, pid_file = tmp_path / "gate", tmp_path / "pipe.pid"
    blocked = f"pipe:echo $$ > {pid_file}; while [ -e {gate} ]; do sleep 0.05; done; cat {truths[0].path}"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows.cli", "tokenize", "--tokenizer", str(tokenizer), "--input"]
    cmd += [str(truths[1].path), "--input", blocked, "--output", str(out), "--batch-size", "4", "--in-process"]
    gate.touch()
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_cli_env(prefect_url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while not (pid_file.exists() and list(out.glob("part-*.parquet"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    took = time.monotonic() - sent
    print(f"SIGTERM to exit: {took:.2f} s")
    assert code != 0 and took < 10, (code, took)
    pipe_pid = int(pid_file.read_text())
    for _ in range(100):
        if (
            not Path(f"/proc/{pipe_pid}").exists()
            or "Z" in Path(f"/proc/{pipe_pid}/stat").read_text().split(")")[1][:3]
        ):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the pipe: command outlived vqpipe tokenize")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries, no lock
    gate.unlink()
    rerun = _run(cmd, tmp_path, _cli_env(prefect_url), timeout=300)
    assert rerun.returncode == 0 and "1 tokenized, 1 already complete, 0 failed" in rerun.stdout, rerun.stderr[-3000:]
