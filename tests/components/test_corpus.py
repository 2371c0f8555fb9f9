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
    assert expand_inputs([f"@{listing}", "s3://b/1.tar"]) == [
        str(tmp_path / "one.tar"), "s3://b/0.tar", "s3://b/1.tar", "pipe:curl -s https://h/2.tar",
    ]


def test_specs_that_name_nothing_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no input shards match"):
        expand_inputs(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="no such file of shard URLs"):
        expand_inputs(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="HTTP has no directory listing"):
        expand_inputs("https://host/*.tar")
