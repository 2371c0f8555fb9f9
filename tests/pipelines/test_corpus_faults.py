"""Faults around a corpus job's output (issue 17): two runs on one output, a part whose footer
cannot be read for a moment, inputs whose part names used to collide."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from components.data import tokens as token_io
from components.data.tokenization import part_names
from pipelines.corpus import CorpusJob, plan_corpus, tokenize_corpus
from pipelines.corpus.planning import LOCK_FILE, OutputBusy, output_lock
from tests.test_compatibility import V0_1_0

TOKENIZER = str(V0_1_0 / "vqvae" / "tokenizer")


@pytest.fixture
def shards(tmp_path):
    paths = []
    for n in range(2):
        path = tmp_path / f"in-{n}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(3):
                buf = io.BytesIO()
                rng = np.random.default_rng([n, i])
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"k{i}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
        paths.append(str(path))
    return paths


def _job(shards, out) -> CorpusJob:
    return CorpusJob(inputs=shards, output=str(out), tokenizer=TOKENIZER, batch_size=4, in_process=True, retries=0)


def test_a_second_run_on_an_output_refuses_naming_the_first_and_keeps_its_temporaries(shards, tmp_path):
    out = tmp_path / "tokens"
    out.mkdir()
    leftover = out / ".part-in-0.parquet.abc123.tmp"  # being written by the first run
    leftover.write_bytes(b"half")
    with output_lock(str(out)):
        with pytest.raises(OutputBusy, match=r"being written by another run \(pid \d+ on "):
            tokenize_corpus(_job(shards, out))
        assert leftover.exists()
    assert not (out / LOCK_FILE).exists()  # let go, and gone from the output
    result = tokenize_corpus(_job(shards, out))  # the next run: a killed run's temporary goes
    assert result.tokenized == 2 and not leftover.exists() and not (out / LOCK_FILE).exists()


def test_a_part_whose_footer_fails_to_read_is_redone_not_deleted(shards, tmp_path, monkeypatch):
    out = tmp_path / "tokens"
    tokenize_corpus(_job(shards, out))
    part = out / part_names(shards)[shards[0]]
    before = part.read_bytes()
    real = token_io.part_info

    def flaky(path, filesystem=None):
        if str(path).endswith(part.name):
            raise OSError("Input/output error (NFS)")
        return real(path, filesystem=filesystem)

    monkeypatch.setattr(token_io, "part_info", flaky)
    monkeypatch.setattr("pipelines.corpus.planning.time.sleep", lambda s: None)
    with output_lock(str(out)):
        plan = plan_corpus(_job(shards, out))
    assert [w.part for w in plan.todo] == [part.name] and part.read_bytes() == before  # still there
    monkeypatch.setattr(token_io, "part_info", real)
    result = tokenize_corpus(_job(shards, out), plan=None)
    assert result.skipped == 2 and part.read_bytes() == before


def test_inputs_whose_names_collided_get_parts_of_their_own():
    inputs = ["/q/d_x-2.tar", "/d/x.tar", "file:///d/x.tar", "/e/a b.tar", "/e/a_b.tar"]
    names = part_names(inputs)
    assert len(set(names.values())) == len(inputs)
    assert part_names(list(reversed(inputs))) == names  # whatever the order
    assert names["/q/d_x-2.tar"] == "part-d_x-2.parquet"  # a name that was unique stays as it was


POISON = """
import os, signal
pid = os.getppid()
while pid > 1:  # up to the Ray worker that runs the actor, and kill it
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        if b"ShardActor" in f.read() or b"default_worker" in open(f"/proc/{pid}/cmdline", "rb").read():
            os.kill(pid, signal.SIGKILL)
            break
    with open(f"/proc/{pid}/status") as f:
        pid = int(next(line.split()[1] for line in f if line.startswith("PPid:")))
"""


def test_a_shard_that_kills_its_worker_fails_alone_and_every_other_shard_completes(shards, tmp_path, ray_cluster):
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    good = shards + [_copy(shards[0], tmp_path / f"more-{n}.tar") for n in range(3)]
    poison = f"pipe:{sys.executable} {script}"
    job = CorpusJob(
        inputs=[good[0], poison, *good[1:]],
        output=str(tmp_path / "tokens"),
        tokenizer=TOKENIZER,
        batch_size=4,
        actors=1,
        retries=0,  # one attempt each: a shard charged for the poison's death would fail
        retry_delay=0,
    )
    result = tokenize_corpus(job)
    assert [f["input_shard"] for f in result.failed] == [poison]
    (failed,) = result.failed
    assert failed["attempts"] == 1 and "Actor" in failed["error"]  # its death alone on an actor
    assert result.tokenized == len(good) and result.manifest["rows"] == 3 * len(good)


def _copy(src: str, dst) -> str:
    shutil.copyfile(src, dst)
    return str(dst)
