"""`vqpipe sample`: images from the project's prior or a registered one; bad settings refused."""

from __future__ import annotations

import shutil

import pytest
import yaml
from PIL import Image

from flows.cli import main


def test_sample_a_class_with_guidance(tiny_project, tmp_path, capsys):
    paths, _ = tiny_project

    def sample(cls: str, out) -> int:
        flags = ["--n", "6", "--class", cls, "--guidance", "2.0", "--seed", "1", "--upscale", "1", "--out", str(out)]
        return main(["--repo", str(paths.root), "sample", *flags])

    out = tmp_path / "grid.png"
    assert sample("2", out) == 0
    width, height = Image.open(out).size
    assert width >= 3 * 16 and height >= 2 * 16 and width > height  # 3 columns, 2 rows of 16 px images
    assert "6 samples of class 2 (triangle), guidance 2 at" in capsys.readouterr().out
    again = tmp_path / "again.png"
    assert sample("triangle", again) == 0
    assert again.read_bytes() == out.read_bytes()  # a class by name, and the seed reproduces


def test_sample_from_the_mlflow_registry(tiny_project, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    from pipelines import registry

    paths, results = tiny_project
    client = MlflowClient(tracking_uri=mlflow_store)
    # The version holding this export (an identical prior trained by another test shares it).
    version = registry.version_of("vqpipe-prior", paths.prior)
    client.set_registered_model_alias("vqpipe-prior", "champion", version)
    out = tmp_path / "registered.png"
    # The registered prior carries its tokenizer: no project needed.
    assert (
        main(
            [
                "--repo",
                str(tmp_path),
                "sample",
                "--n",
                "4",
                "--prior",
                "models:/vqpipe-prior@champion",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.is_file()


def test_bad_sampling_requests_exit_2_and_draw_nothing(tiny_project, tmp_path, capsys):
    paths, _ = tiny_project
    out = tmp_path / "none.png"
    base = ["--repo", str(paths.root), "sample", "--n", "4", "--out", str(out)]
    for extra, message in (
        (["--class", "9"], "class 9 out of range [0, 4): 0=circle"),
        (["--class", "hexagon"], "no class named 'hexagon'"),
        (["--top-p", "1.5"], "--top-p: Input should be less than or equal to 1"),
        (["--top-k", "0"], "--top-k: Input should be greater than or equal to 1"),
        (["--decode-steps", "0"], "--decode-steps: Input should be greater than or equal to 1"),
        (["--guidance-schedule", "cosine"], "--guidance-schedule: Input should be 'constant' or 'linear'"),
        (["--prior", str(tmp_path)], "is not a prior export"),
    ):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_renamed_flag_is_refused_naming_the_new_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--repo", str(tmp_path), "sample", "--cfg", "2.0"])
    assert exit_.value.code == 2 and "--cfg was renamed to --guidance" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["tokenize", "--tokenizer", "t", "--input", "i", "--output", "o", "--workers", "2"])
    assert exit_.value.code == 2 and "--workers was renamed to --actors" in capsys.readouterr().err


def test_sampling_defaults_come_from_the_projects_params(tiny_project, tmp_path):
    """`vqpipe sample` draws with the project's sample.sampling unless a flag says otherwise:
    top_k 1 there makes sampling greedy, so two seeds give the same images."""
    paths, _ = tiny_project
    shutil.copytree(paths.root / "models", tmp_path / "models")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sample": {"sampling": {"top_k": 1}}}))
    grids = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}.png"
        assert (
            main(["--repo", str(tmp_path), "sample", "--n", "4", "--class", "0", "--seed", seed, "--out", str(out)])
            == 0
        )
        grids.append(out.read_bytes())
    assert grids[0] == grids[1]
    out = tmp_path / "flag.png"
    args = ["--repo", str(tmp_path), "sample", "--n", "4", "--class", "0", "--seed", "2", "--top-k", "5"]
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_bytes() != grids[1]  # the flag wins over the project's value
