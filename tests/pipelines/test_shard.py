import json
import tarfile

from PIL import Image

from components.config import parse_params
from components.data.shards import read_manifest
from pipelines import shard
from pipelines.runtime import Paths
from tests.conftest import TINY


def _count_tar_samples(path) -> int:
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers()})


def test_folder_source_shards_good_images_and_rejects_bad_ones(tmp_path):
    root = tmp_path / "images"
    for cls, colour in (("cats", (200, 10, 10)), ("dogs", (10, 200, 10))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 30), colour).save(root / cls / f"{i}.png")
    Image.new("RGBA", (20, 20)).save(root / "dogs" / "alpha.webp")
    Image.new("L", (20, 20)).save(root / "cats" / "gray.bmp")
    good = root / "cats" / "0.png"
    (root / "cats" / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "dogs" / "notes.jpg").write_text("this is text, not a JPEG")
    (root / "dogs" / "empty.png").write_bytes(b"")

    cfg = parse_params({**TINY, "shard": {**TINY["shard"], "source": f"folder:{root}"}}).shard
    result = shard.run(cfg, Paths(tmp_path))
    manifest = read_manifest(tmp_path / "data" / "shards")

    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["inputs"] == 11
    assert manifest["samples"]["train"] + manifest["samples"]["val"] == 8
    assert manifest["rejected"] == 3
    rejects = [json.loads(line) for line in (tmp_path / "data" / "shards" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["input"]: r["reason"] for r in rejects}
    assert set(reasons) == {"cats/truncated.png", "dogs/notes.jpg", "dogs/empty.png"}
    assert "truncated" in reasons["cats/truncated.png"]
    assert "not an image" in reasons["dogs/notes.jpg"] and "empty" in reasons["dogs/empty.png"]
    # Counts add up shard by shard, and against what the tar files really hold.
    for entry in manifest["shards"]:
        assert entry["inputs"] == entry["samples"] + entry["rejected"]
        assert _count_tar_samples(tmp_path / "data" / "shards" / entry["name"]) == entry["samples"]
    assert result.manifest == manifest


def test_ray_partitions_give_identical_shards(tmp_path, ray_cluster):
    cfg = parse_params({**TINY, "shard": {**TINY["shard"], "num_images": 60}}).shard
    local = shard.run(cfg, Paths(tmp_path / "local")).manifest
    on_ray = shard.run(cfg.model_copy(update={"ray_min_inputs": 1}), Paths(tmp_path / "ray")).manifest
    assert [s["sha256"] for s in on_ray["shards"]] == [s["sha256"] for s in local["shards"]]
    assert on_ray["samples"] == local["samples"]
