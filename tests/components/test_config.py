import os
import shutil
from pathlib import Path

import pytest
import yaml

from components.config import (
    RENAMED,
    SECTIONS,
    STAGE_SECTIONS,
    ConfigError,
    Params,
    load_params,
    outcome_params,
    parse_params,
)
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.shard.source == "builtin:shapes"
    assert params.train_tokenizer.quantizer.type == "vq"
    assert params.shard.image_size % params.train_tokenizer.downsample == 0


def _problems(raw) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    return dict(info.value.problems)


def test_unknown_key_names_key_and_allowed():
    problems = _problems({"train_prior": {"n_layers": 4}})
    assert "train_prior.n_layers" in problems
    assert "n_layer" in problems["train_prior.n_layers"] and "allowed" in problems["train_prior.n_layers"]


def test_unknown_section():
    problems = _problems({"trian_prior": {}})
    assert "trian_prior" in problems and "train_prior" in problems["trian_prior"]


def test_wrong_type():
    problems = _problems({"train_prior": {"steps": "many"}})
    assert "train_prior.steps" in problems and "many" in problems["train_prior.steps"]


def test_codebook_too_small():
    problems = _problems({"train_tokenizer": {"quantizer": {"type": "vq", "codebook_size": 1}}})
    assert "train_tokenizer.quantizer.codebook_size" in problems


def test_unknown_quantizer_lists_registered():
    problems = _problems({"train_tokenizer": {"quantizer": {"type": "kmeans"}}})
    message = problems["train_tokenizer.quantizer"]
    for kind in ("vq", "gumbel", "product", "residual", "fsq", "lfq"):
        assert kind in message


def _quantizer_problems(quantizer: dict, latent_dim: int = 32) -> dict[str, str]:
    return _problems({"train_tokenizer": {"latent_dim": latent_dim, "quantizer": quantizer}})


def test_option_of_another_quantizer_names_key_and_owner():
    problems = _quantizer_problems({"type": "vq", "levels": [8, 5, 5]})
    assert "fsq" in problems["train_tokenizer.quantizer.levels"]
    assert "codebook_size" in problems["train_tokenizer.quantizer.levels"]  # vq's own options listed


@pytest.mark.parametrize(
    "quantizer, latent_dim, key",
    [
        ({"type": "vq", "codebook_dim": 64}, 32, "codebook_dim"),
        ({"type": "product", "groups": 4, "codebook_dim": 16}, 32, "codebook_dim"),
        ({"type": "product", "groups": 3}, 32, "groups"),
        ({"type": "residual", "codebook_dim": 40}, 32, "codebook_dim"),
        ({"type": "fsq", "levels": [8, 1, 5]}, 32, "levels"),
        ({"type": "fsq", "levels": [5] * 8}, 4, "levels"),
        ({"type": "lfq", "codebook_size": 2**32}, 64, "codebook_size"),
        ({"type": "lfq", "codebook_size": 1000}, 32, "codebook_size"),
        ({"type": "lfq", "codebook_size": 2**18}, 16, "codebook_size"),
        ({"type": "gumbel", "temperature_start": 0.5, "temperature_end": 1.0}, 32, ""),
    ],
)
def test_quantizer_options_that_cannot_work_fail_at_load(quantizer, latent_dim, key):
    problems = _quantizer_problems(quantizer, latent_dim)
    expected = "train_tokenizer.quantizer" + (f".{key}" if key else "")
    assert expected in problems, problems


def test_dumps_carry_the_chosen_quantizers_options():
    """MLflow params and exports come from dumps: they must hold `levels`, not only `type`."""
    params = parse_params({"train_tokenizer": {"quantizer": {"type": "fsq", "levels": [3, 5]}}})
    assert params.model_dump()["train_tokenizer"]["quantizer"] == {"type": "fsq", "levels": [3, 5]}
    assert parse_params(params.model_dump()) == params


def test_every_quantizer_type_loads_with_defaults():
    from components.quantizers import QUANTIZERS

    for kind in QUANTIZERS:
        params = parse_params({"train_tokenizer": {"quantizer": {"type": kind}}})
        assert params.train_tokenizer.quantizer.type == kind
        assert params.train_tokenizer.quantizer.codebook_size >= 2


def test_unknown_source():
    problems = _problems({"shard": {"source": "s3:bucket"}})
    assert "builtin:shapes" in problems["shard.source"] and "folder:PATH" in problems["shard.source"]
    problems = _problems({"shard": {"source": "builtin:mnist"}})
    assert "shapes" in problems["shard.source"]


def test_image_size_not_divisible_by_downsampling():
    problems = _problems(
        {"shard": {"image_size": 24}, "train_tokenizer": {"downsample": 16, "quantizer": {"type": "vq"}}}
    )
    assert "train_tokenizer.downsample" in problems and "8" in problems["train_tokenizer.downsample"]


def test_downsample_power_of_two_and_heads():
    problems = _problems(
        {"train_tokenizer": {"downsample": 3, "quantizer": {"type": "vq"}}, "train_prior": {"n_embd": 30, "n_head": 4}}
    )
    assert "train_tokenizer.downsample" in problems
    assert any(k.startswith("train_prior") for k in problems)


def test_tiny_config_is_valid():
    parse_params(TINY)


def test_load_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("shard: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        load_params(tmp_path / "params.yaml")


def test_stage_exits_2_before_any_work(tmp_path):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"shard": {"image_size": "big"}}))
    # MLflow's default store (sqlite:///mlflow.db in the cwd): a stage that began its work
    # would create it there.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.shard"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert "shard.image_size" in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_validate_exit_status(tmp_path, capsys):
    from flows.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sample": {"top_k": 0}}))
    assert main(["--repo", str(tmp_path), "validate"]) == 2
    assert "sample.top_k" in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["--repo", str(tmp_path), "validate"]) == 0


def test_cli_validate_names_keys_dvc_tracks_but_params_lack(tmp_path, capsys):
    """The typed params would fill in a default, but DVC refuses to run without the key."""
    from flows.cli import main

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert main(["--repo", str(tmp_path), "validate"]) == 2  # no params.yaml at all
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--repo", str(tmp_path), "validate"]) == 0
    del params["train_prior"]["lr"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()
    assert main(["--repo", str(tmp_path), "validate"]) == 2
    assert "train_prior.lr: missing from params.yaml" in capsys.readouterr().err


def _dvc_params() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("params", []) for name, stage in stages.items()}


def test_dvc_yaml_tracks_exactly_the_outcome_settings():
    """dvc.yaml and the typed config cannot drift: each stage tracks every setting of its section
    that changes what it produces, and no runtime one."""
    tracked = _dvc_params()
    for listing in ("source_fingerprint", "weights_fingerprint"):
        assert tracked.pop(listing) == []  # it runs every time: params would change nothing
    assert set(tracked) == set(STAGE_SECTIONS)
    for section in SECTIONS:
        assert tracked.get(section, []) == outcome_params(section), section
    every = {f"{s}.{k}" for s in SECTIONS for k in Params.model_fields[s].annotation.model_fields}
    runtime_keys = every - {k for keys in tracked.values() for k in keys} - {"sample.sampling", "evaluate.sampling"}
    # What a user may change without rerunning anything: intervals, devices, worker counts (the
    # data order depends on the lanes instead), checkpoint places, the registry name.
    assert "train_tokenizer.log_every" in runtime_keys and "tokenize.actors" in runtime_keys
    for workers in ("train_tokenizer.ddp_workers", "train_tokenizer.loader_workers", "train_prior.ddp_workers"):
        assert workers in runtime_keys
    assert "train_tokenizer.lanes" not in runtime_keys and "train_prior.lanes" not in runtime_keys
    assert "train_tokenizer.precision" not in runtime_keys  # bf16 changes results


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_a_renamed_key_is_refused_naming_its_new_one(old, new):
    raw: dict = {}
    node = raw
    *parents, leaf = old.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = 1
    problems = _problems(raw)
    assert list(problems) == [old] and new in problems[old]


def test_sampling_options_are_checked_once_where_they_are_made():
    with pytest.raises(ConfigError, match=r"sample.sampling.temperature"):
        parse_params({"sample": {"sampling": {"temperature": 0}}})
    with pytest.raises(ConfigError, match=r"evaluate.sampling.top_p"):
        parse_params({"evaluate": {"sampling": {"top_p": 1.5}}})
    assert parse_params({"sample": {"sampling": {"guidance_scale": 3}}}).sample.sampling.guided
