"""`vqpipe sample`: images from the project's prior or a registered one; bad settings refused."""

from __future__ import annotations

from PIL import Image

from flows.cli import main


def test_sample_a_class_with_guidance(tiny_project, tmp_path, capsys):
    paths, _ = tiny_project
    out = tmp_path / "grid.png"
    code = main(
        [
            "--repo",
            str(paths.root),
            "sample",
            "--n",
            "6",
            "--class",
            "2",
            "--guidance",
            "2.0",
            "--seed",
            "1",
            "--upscale",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    width, height = Image.open(out).size
    assert width >= 3 * 16 and height >= 2 * 16 and width > height  # 3 columns, 2 rows of 16 px images
    assert "6 samples of class 2 (triangle), cfg 2 at" in capsys.readouterr().out
    again = tmp_path / "again.png"
    main(
        [
            "--repo",
            str(paths.root),
            "sample",
            "--n",
            "6",
            "--class",
            "triangle",
            "--guidance",
            "2.0",
            "--seed",
            "1",
            "--upscale",
            "1",
            "--out",
            str(again),
        ]
    )
    assert again.read_bytes() == out.read_bytes()  # a class by name, and the seed reproduces


def test_sample_from_the_mlflow_registry(tiny_project, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    paths, results = tiny_project
    client = MlflowClient(tracking_uri=mlflow_store)
    version = next(
        v for v in client.search_model_versions("name='vqpipe-prior'") if v.run_id == results["train_prior"].run_id
    )
    client.set_registered_model_alias("vqpipe-prior", "champion", version.version)
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
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "0"], "top_k must be >= 1"),
        (["--prior", str(tmp_path)], "is not a prior export"),
    ):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert not out.exists()
