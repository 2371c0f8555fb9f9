"""Input shard specs: brace patterns, globs, files of URLs, fsspec URLs, pipes."""

import pytest

from components.data.corpus import expand_inputs


def test_brace_patterns_expand_without_listing():
    assert expand_inputs("s3://bucket/laion/{00000..00002}.tar") == [f"s3://bucket/laion/0000{i}.tar" for i in range(3)]
    assert expand_inputs("https://host/{a,b}.tar") == ["https://host/a.tar", "https://host/b.tar"]


def test_globs_list_local_and_fsspec_filesystems_in_order(tmp_path):
    for name in ("b.tar", "a.tar", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/corpus/x-1.tar": b"", "/corpus/x-0.tar": b""})
    assert expand_inputs("memory://corpus/x-*.tar") == ["memory:///corpus/x-0.tar", "memory:///corpus/x-1.tar"]


def test_files_of_urls_pipes_and_repeats(tmp_path):
    (tmp_path / "one.tar").write_bytes(b"")
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# shards\n{tmp_path / 'one.tar'}\n\ns3://b/{{0..1}}.tar\npipe:curl -s https://h/2.tar\n")
    assert expand_inputs([f"@{listing}", "s3://b/1.tar"], allow_pipe_in_lists=True) == [
        str(tmp_path / "one.tar"),
        "s3://b/0.tar",
        "s3://b/1.tar",
        "pipe:curl -s https://h/2.tar",
    ]


def test_specs_that_name_nothing_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no input shards match"):
        expand_inputs(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="no such file of shard URLs"):
        expand_inputs(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="HTTP has no directory listing"):
        expand_inputs("https://host/*.tar")


# -- reading shards ------------------------------------------------------------------------------

import io  # noqa: E402
import tarfile  # noqa: E402

from components.data.corpus import ShardUnreadable, read_shard  # noqa: E402
from components.data.tokenization import part_names  # noqa: E402


def _tar(path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_read_shard_groups_members_by_key_from_paths_urls_and_pipes(tmp_path):
    _tar(tmp_path / "a.tar", {"x/k1.png": b"P1", "x/k1.txt": b"t1", "x/k1.seg.json": b"{}", "k2.jpg": b"J2"})
    expected = [{"__key__": "x/k1", "png": b"P1", "txt": b"t1", "seg.json": b"{}"}, {"__key__": "k2", "jpg": b"J2"}]
    for url in (str(tmp_path / "a.tar"), f"file://{tmp_path / 'a.tar'}", f"pipe:cat {tmp_path / 'a.tar'}"):
        got = [{k: v for k, v in s.items() if k != "__url__"} for s in read_shard(url)]
        assert got == expected, url


def test_unreadable_shards_raise_naming_the_cause(tmp_path):
    data = _tar(tmp_path / "a.tar", {"k1.png": b"x" * 600, "k2.png": b"y" * 600})
    (tmp_path / "cut-inside.tar").write_bytes(data[:700])
    (tmp_path / "cut-between.tar").write_bytes(data[: 512 + 1024])  # k1 whole, no end blocks
    (tmp_path / "not.tar").write_bytes(b"hello" * 300)
    cases = {
        "cut-inside.tar": "truncated tar",
        "cut-between.tar": "truncated tar",
        "not.tar": "invalid header",
        "missing.tar": "no such shard",
    }
    for name, reason in cases.items():
        with pytest.raises(ShardUnreadable, match=reason):
            list(read_shard(str(tmp_path / name)))
    with pytest.raises(ShardUnreadable, match="command exited with status 3"):
        list(read_shard("pipe:echo oops >&2; exit 3"))


def test_part_names_are_stable_and_unique():
    assert part_names(["s3://b/laion/00001.tar"]) == {"s3://b/laion/00001.tar": "part-00001.parquet"}
    names = part_names(["/a/x/0.tar", "/b/x/0.tar", "/c/1.tar.gz", "pipe:curl -s https://h/d/2.tar"])
    assert names == {
        "/a/x/0.tar": "part-a_x_0.parquet",
        "/b/x/0.tar": "part-b_x_0.parquet",
        "/c/1.tar.gz": "part-1.parquet",
        "pipe:curl -s https://h/d/2.tar": "part-2.parquet",
    }
    same_path = part_names(["/d/0.tar", "file:///d/0.tar"])
    assert len(set(same_path.values())) == 2
