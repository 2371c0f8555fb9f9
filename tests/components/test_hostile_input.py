"""Hostile input (issue 17): each case here hung, crashed or lost count before its fix."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import ConfigError, parse_params, read_yaml
from components.data.corpus import ListCycle, ShardUnreadable, expand_inputs, read_shard
from components.data.images import decode_image
from components.data.limits import ReadLimits
from components.data.shard_writer import ShardLayout, write_unit
from components.data.sources import ImageFolder
from components.data.tar_source import TarShards
from components.data.units import SourceUnit

LAYOUT = ShardLayout(image_size=8, val_fraction=0.5, seed=0, samples_per_shard=100)


def _png(size: tuple[int, int] = (12, 10), seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _in_time(fn, seconds: float):
    """fn() on a thread; fails the test (rather than hanging it) when it does not return in time."""
    box: dict = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _gone(pid: int, wait: float = 5.0) -> bool:
    """Whether the process has ended (a zombie waiting for its parent counts as ended)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _write(source, unit: SourceUnit, tmp_path: Path):
    (tmp_path / "out").mkdir(exist_ok=True)
    return write_unit(source, unit, tmp_path / "out", LAYOUT)


def _written(result) -> int:
    return sum(s.samples for s in result.outputs)


def test_a_pipe_that_fills_its_stderr_does_not_hang(tmp_path):
    # More than a pipe's 64 KiB on stderr before the shard: stderr was read only after stdout ended.
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        _member(t, "k.png", _png())
    command = f"pipe:bash -c 'head -c 200000 /dev/zero | tr \"\\0\" x >&2; cat {tar}'"
    samples = _in_time(lambda: list(read_shard(command)), 30)
    assert [s["__key__"] for s in samples] == ["k"]


def test_a_silent_pipe_is_killed_after_the_idle_timeout_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    command = f"pipe:bash -c 'sleep 60 & echo $! > {marker}; wait'"
    started = time.monotonic()
    with pytest.raises(ShardUnreadable, match="pipe_idle_timeout"):
        _in_time(lambda: list(read_shard(command, ReadLimits(pipe_idle_timeout=1))), 30)
    assert time.monotonic() - started < 10
    assert _gone(int(marker.read_text()))  # the command's background child went with it


def test_a_shard_over_its_timeout_is_unreadable(tmp_path):
    limits = ReadLimits(pipe_idle_timeout=0, shard_timeout=1)
    with pytest.raises(ShardUnreadable, match="shard_timeout"):
        _in_time(lambda: list(read_shard("pipe:sleep 60", limits)), 30)


def test_images_over_the_pixel_limit_are_one_reject_and_pillows_warning_is_no_error(tmp_path, monkeypatch):
    # Between Pillow's limit and twice it, Pillow warns; the warning used to become an uncaught error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decode_image(_png((12, 10))).size == (12, 10)  # 120 pixels: warned, decoded
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        _member(t, "small.png", _png((12, 10)))
        _member(t, "big.png", _png((40, 30)))
    source = TarShards(str(tar))
    (tmp_path / "out").mkdir()
    layout = ShardLayout(image_size=8, val_fraction=0.5, seed=0, samples_per_shard=100, max_image_pixels=1000)
    result = write_unit(source, source.units()[0][0], tmp_path / "out", layout)
    assert result.error is None and result.inputs == 2 and _written(result) == 1
    (reject,) = result.rejects
    assert "big" in reject.input and "1,200 pixels" in reject.reason and "max_image_pixels" in reject.reason


def test_odd_tar_members_are_each_accounted_for(tmp_path):
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        _member(t, "dir", kind=tarfile.DIRTYPE)  # holds nothing: not an input
        _member(t, "a.png", _png(seed=1))
        _member(t, "a.cls", b"99999999999")  # above int32: kept as text, never an OverflowError
        _member(t, ".hidden", b"x")
        _member(t, "README", b"x")
        _member(t, "ln.png", kind=tarfile.SYMTYPE, link="a.png")
        _member(t, "fifo.png", kind=tarfile.FIFOTYPE)
        _member(t, "b.png", _png(seed=2))
        _member(t, "b.png", _png(seed=3))  # the same field twice: it used to overwrite the first
        _member(t, "c.png", _png(seed=4))
        _member(t, "a.jpg", _png(seed=5))  # key `a` again, after others: it used to give two samples
        _member(t, "d.png", b"0" * 5000)  # over max_member_bytes: skipped unread
    source = TarShards(str(tar), ReadLimits(max_member_bytes=4000))
    result = _write(source, source.units()[0][0], tmp_path)
    reasons = {r.input.split("#")[1]: r.reason for r in result.rejects}
    assert set(reasons) == {".hidden", "README", "ln.png", "fifo.png", "b", "a", "d"}
    assert "symbolic link" in reasons["ln.png"] and "FIFO" in reasons["fifo.png"]
    assert "twice" in reasons["b"] and "duplicate key" in reasons["a"] and "max_member_bytes" in reasons["d"]
    assert result.inputs == 9 == _written(result) + len(result.rejects)
    keys = [s["__key__"] for out in result.outputs for s in read_shard(str(tmp_path / "out" / out.file))]
    assert sorted(keys) == ["a", "c"]


def test_a_huge_cls_does_not_fail_a_tokenized_shard(tmp_path):
    from components.data.tokenization import ShardTask, tokenize_shard
    from components.tokenizers import Tokenizer
    from tests.test_compatibility import V0_1_0

    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        _member(t, "a.png", _png(seed=1))
        _member(t, "a.cls", b"99999999999")
        _member(t, "b.png", _png(seed=2))
        _member(t, "b.cls", b"3")
    tokenizer = Tokenizer.load(V0_1_0 / "vqvae" / "tokenizer")
    result = tokenize_shard(tokenizer, ShardTask(str(tar), str(tmp_path / "out"), "p.parquet"), 4, 1)
    assert (result.samples, result.rows, result.rejects) == (2, 2, [])
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "p.parquet")
    assert table.column("cls").to_pylist() == ["99999999999", "3"]  # not an int32 label: kept as text


def test_folders_read_only_regular_files_bounded_and_any_file_name(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(_png(seed=1))
    (root / "big.png").write_bytes(_png((64, 64), seed=2))
    os.symlink("/dev/zero", root / "zero.png")  # used to exhaust memory
    os.mkfifo(root / "fifo.png")  # used to hang the stage
    weird = os.fsdecode(b"caf\xe9-\xff.png")  # not UTF-8: used to crash the stage
    (root / weird).write_bytes(_png(seed=3))
    source = ImageFolder(root, ReadLimits(max_file_bytes=2000))
    items, rejects = source.items()
    assert {r.input: r.reason.split(" (")[0] for r in rejects} == {
        "zero.png": "a symbolic link",
        "fifo.png": "a FIFO",
    }
    unit = SourceUnit(0, "all", items)
    result = _in_time(lambda: _write(source, unit, tmp_path), 30)
    assert result.error is None and result.inputs == 3
    (too_big,) = result.rejects
    assert too_big.input == "big.png" and "max_file_bytes" in too_big.reason
    samples = [s for out in result.outputs for s in read_shard(str(tmp_path / "out" / out.file))]
    sources = sorted(__import__("json").loads(s["json"])["source"] for s in samples)
    assert sources == ["caf\\xe9-\\xff.png", "ok.png"]


def test_a_file_replaced_by_a_fifo_after_listing_is_a_reject_not_a_hang(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    source = ImageFolder(root)
    items, _ = source.items()
    (root / "a.png").unlink()
    os.mkfifo(root / "a.png")
    result = _in_time(lambda: _write(source, SourceUnit(0, "all", items), tmp_path), 30)
    assert result.inputs == 1 and "no longer a regular file" in result.rejects[0].reason


def test_a_list_that_includes_itself_names_the_cycle(tmp_path):
    (tmp_path / "a.txt").write_text(f"{tmp_path}/x.tar\n@{tmp_path}/b.txt\n")
    (tmp_path / "b.txt").write_text(f"@{tmp_path}/a.txt\n")
    with pytest.raises(ListCycle, match=r"a\.txt -> @.*b\.txt -> @.*a\.txt"):
        expand_inputs(f"@{tmp_path}/a.txt")


def test_vqpipe_tokenize_exits_2_on_a_list_cycle(tmp_path):
    from tests.test_compatibility import V0_1_0

    (tmp_path / "a.txt").write_text(f"@{tmp_path}/a.txt\n")
    run = subprocess.run(
        [".venv/bin/vqpipe", "tokenize", "--tokenizer", str(V0_1_0 / "vqvae" / "tokenizer")]
        + ["--input", f"@{tmp_path}/a.txt"]
        + ["--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "includes itself" in run.stderr, run.stderr[-2000:]


def test_pipe_lines_in_a_list_run_only_when_allowed(tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text("pipe:cat /etc/hostname\n")
    with pytest.raises(ValueError, match="allow-pipe"):
        expand_inputs(f"@{listing}")
    with pytest.raises(ValueError, match="allow_pipe_in_lists"):
        TarShards(f"@{listing}")
    assert expand_inputs(f"@{listing}", allow_pipe_in_lists=True) == ["pipe:cat /etc/hostname"]
    assert expand_inputs("pipe:cat x.tar") == ["pipe:cat x.tar"]  # given directly: the user's own command


def test_one_shard_named_two_ways_is_read_once(tmp_path):
    assert expand_inputs([f"{tmp_path}/x.tar", f"file://{tmp_path}/x.tar"]) == [f"{tmp_path}/x.tar"]


def test_seeds_out_of_range_and_repeated_yaml_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="train_tokenizer.seed"):
        parse_params({"train_tokenizer": {"seed": 1180591620717411303424}})
    with pytest.raises(ConfigError, match="shard.seed"):
        parse_params({"shard": {"seed": -1}})
    assert parse_params({"train_tokenizer": {"lr": "1e-3"}}).train_tokenizer.lr == 1e-3  # YAML's string
    path = tmp_path / "params.yaml"
    path.write_text("train_tokenizer:\n  steps: 10\n  lr: 0.001\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"'steps' given twice \(lines 2 and 4\)"):
        read_yaml(path)


def test_the_training_stages_cannot_share_a_checkpoint_folder():
    with pytest.raises(ConfigError, match="train_prior.checkpoint_dir"):
        parse_params({"train_tokenizer": {"checkpoint_dir": "ck"}, "train_prior": {"checkpoint_dir": "ck/"}})
    with pytest.raises(ConfigError, match="overlaps"):
        parse_params({"train_tokenizer": {"checkpoint_dir": "ck"}, "train_prior": {"checkpoint_dir": "ck/prior"}})
    parse_params({"train_tokenizer": {"checkpoint_dir": "ck/tok"}, "train_prior": {"checkpoint_dir": "ck/prior"}})


def test_a_reader_stopped_early_leaves_no_command_running(tmp_path):
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        for i in range(3):
            _member(t, f"k{i}.png", _png(seed=i))
    marker = tmp_path / "pid"
    reader = read_shard(f"pipe:bash -c 'echo $$ > {marker}; cat {tar}; sleep 60'")
    next(reader)
    reader.close()
    assert _gone(int(marker.read_text()))


def test_atomic_writes_sync_the_file_then_its_folder(tmp_path, monkeypatch):
    from components.io import atomic_write

    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
    assert len(synced) == 2 and ".a.json." in synced[0] and synced[1] == str(tmp_path)


def test_replaced_files_and_folders_get_the_umask_or_keep_their_mode(tmp_path):
    """Temporary files are 0600 and folders 0700: renamed into place as they were, the models and
    token parts were unreadable to anyone but their writer."""
    from components.io import atomic_write, replace_dir

    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
        replace_dir(tmp_path / "export", lambda d: (d / "config.json").write_text("{}"))
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
        os.chmod(tmp_path / "a.json", 0o640)  # a mode the user chose is kept through rewrites
        os.chmod(tmp_path / "export", 0o750)
        atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("[]"))
        replace_dir(tmp_path / "export", lambda d: (d / "config.json").write_text("[]"))
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
        assert (tmp_path / "export").stat().st_mode & 0o777 == 0o750
        os.umask(0o077)
        atomic_write(tmp_path / "b.json", lambda tmp: Path(tmp).write_text("{}"))
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(mask)


def test_an_export_is_replaced_as_a_unit_or_not_at_all(tmp_path):
    from components.io import replace_dir

    export = tmp_path / "export"
    replace_dir(export, lambda d: [(d / n).write_text(f"old {n}") for n in ("config.json", "model.safetensors")])

    def half(d: Path) -> None:
        (d / "model.safetensors").write_text("new weights")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(export, half)
    assert {p.name: p.read_text() for p in export.iterdir()} == {
        "config.json": "old config.json",
        "model.safetensors": "old model.safetensors",
    }
    replace_dir(export, lambda d: [(d / n).write_text(f"new {n}") for n in ("config.json", "model.safetensors")])
    assert sorted(p.read_text() for p in export.iterdir()) == ["new config.json", "new model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging or old copy left


def test_weight_files_are_looked_for_in_the_project_not_the_working_directory(tmp_path, monkeypatch):
    from components.config import load_params

    repo = tmp_path / "repo"
    (repo / "weights").mkdir(parents=True)
    (repo / "weights" / "inception.safetensors").write_bytes(b"")
    (repo / "params.yaml").write_text("evaluate:\n  inception_weights: weights/inception.safetensors\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: `vqpipe validate --repo repo`
    assert load_params(repo / "params.yaml").evaluate.inception_weights == "weights/inception.safetensors"
    (repo / "params.yaml").write_text("evaluate:\n  perceptual_weights: weights/lpips.safetensors\n")
    with pytest.raises(
        ConfigError, match=r"evaluate.perceptual_weights: weights/lpips.safetensors not found in .*repo"
    ):
        load_params(repo / "params.yaml")
