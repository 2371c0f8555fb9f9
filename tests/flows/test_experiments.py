"""`vqpipe exp`'s values and checks, before DVC sees them (the queue itself runs in the e2e test)."""

from __future__ import annotations

import pytest
import yaml

from components.config import ConfigError, parse_params
from flows.experiments import Experiment, parse_overrides, parse_value, set_args, table
from tests.conftest import TINY


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 0.001),
        ("2E5", 200000.0),
        ("10", 10),
        ("-1", -1),
        ('"1e-3"', "1e-3"),
        ("null", None),
        ("[8, 5, 5]", [8, 5, 5]),
        ("true", True),
        ("cosine", "cosine"),
        ("0.5", 0.5),
    ],
)
def test_values_are_read_as_yaml_1_2_reads_them(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_overrides_are_validated_with_the_projects_params(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(parse_params(TINY).model_dump(mode="json")))
    assert parse_overrides(tmp_path, ["train_prior.lr=1e-3", "train_tokenizer.quantizer.codebook_size=32"]) == {
        "train_prior.lr": 0.001,
        "train_tokenizer.quantizer.codebook_size": 32,
    }
    with pytest.raises(ConfigError, match="train_prior.lrr: unknown key"):
        parse_overrides(tmp_path, ["train_prior.lrr=1e-3"])
    with pytest.raises(ConfigError, match="train_tokenizer.lanes"):
        parse_overrides(tmp_path, ["train_tokenizer.lanes=64"])  # more lanes than the batch has samples
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_overrides(tmp_path, ["train_prior.lr"])
    with pytest.raises(ValueError, match="not YAML"):
        parse_overrides(tmp_path, ["train_prior.lr=[1,"])
    # DVC (Hydra's grammar) gets JSON, which it reads back as the same values.
    assert set_args({"a.b": 0.001, "c": None, "d": [1, 2], "e": "x y"}) == [
        *("-S", "a.b=0.001", "-S", "c=null", "-S", "d=[1, 2]", "-S", 'e="x y"'),
    ]


def test_the_table_shows_the_params_that_differ_and_the_headline_metrics():
    rows = [
        Experiment("main", "abc1234", True, "", {"train_prior.lr": "0.003", "seed": "0"}, {"evaluate.psnr": 24.1}),
        Experiment(
            "lr", "def5678", False, "success", {"train_prior.lr": "0.001", "seed": "0"}, {"evaluate.psnr": 24.3}
        ),
    ]
    lines = table(rows).splitlines()
    assert lines[0] == "| experiment | rev | state | train_prior.lr | evaluate.psnr |"
    assert lines[3] == "| └ lr | def5678 | success | 0.001 | 24.3 |"
