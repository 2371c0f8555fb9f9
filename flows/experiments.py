"""`vqpipe exp`: DVC experiments with the project's checks and MLflow runs.

    vqpipe exp run -S train_prior.lr=1e-3 [-S ...] [--queue] [-n NAME]
    vqpipe exp run --run-all [-j 2]      # the queued ones, each in its own temporary workspace
    vqpipe exp show                      # experiments, the params they changed, headline metrics

Values are read as YAML 1.2 reads them (`1e-3` is a number, `null` is None, `[8, 5, 5]` a
list) and the params they make are validated before DVC sees them: a bad key or value is an
error naming it, and nothing is queued or run. Each experiment's stages log under one MLflow
parent run tagged with its DVC name and changed params (pipelines/tracking.py), in the
project's store whichever workspace DVC runs it in. An experiment in the workspace (no
--queue) holds the project lock as `vqpipe run` does; queued ones run in DVC's temporary
workspaces and take no lock.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from components.config import parse_params, read_yaml
from flows.dvc import dvc_env
from pipelines.tracking import flatten, metric_files, metric_numbers

# YAML 1.2's floats, which PyYAML (YAML 1.1) reads as strings when they lack a dot: 1e-3, 2E5.
_FLOAT_12 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


class ExperimentError(RuntimeError):
    pass


def parse_value(text: str) -> Any:
    """A -S value as YAML 1.2 reads it."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str) and value == text.strip() and _FLOAT_12.match(value):  # unquoted
        return float(value)
    return value


def parse_overrides(repo: Path, pairs: list[str]) -> dict[str, Any]:
    """{"train_prior.lr": 0.001}: `key=value` pairs, checked by validating params.yaml with them
    applied (ConfigError naming the bad keys; ValueError for a pair without `=`)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"-S {pair!r}: expected KEY=VALUE, e.g. train_prior.lr=1e-3")
        try:
            overrides[key.strip()] = parse_value(text)
        except yaml.YAMLError as err:
            raise ValueError(f"-S {pair!r}: the value is not YAML ({str(err).splitlines()[0]})") from None
    raw = copy.deepcopy(read_yaml(repo / "params.yaml")) or {}
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # a new section or group: validation names it when it is not one
            node = node[part]
        node[leaf] = value
    parse_params(raw, f"params.yaml with {', '.join(pairs)}", repo)
    return overrides


def set_args(overrides: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments DVC (Hydra's override grammar) reads back as the same values."""
    args = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={json.dumps(value)}"]
    return args


def exp_run(
    repo: Path,
    overrides: dict[str, Any],
    *,
    queue: bool = False,
    name: str | None = None,
    run_all: bool = False,
    jobs: int = 1,
    on_line: Callable[[str], None] = print,
) -> None:
    """`dvc exp run` with these params, its output line by line; ExperimentError when it fails."""
    cmd = [sys.executable, "-m", "dvc", "exp", "run"]
    if run_all:
        cmd += ["--run-all", "--jobs", str(jobs)]
    else:
        cmd += set_args(overrides) + (["--queue"] if queue else []) + (["--name", name] if name else [])
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=repo, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            on_line(lines[-1])
        code = proc.wait()
    if code != 0:
        tail = "\n".join(lines[-15:])
        raise ExperimentError(f"dvc exp run failed (exit {code}):\n{tail}")


class Experiment(NamedTuple):
    name: str  # the DVC experiment's name; the baseline's branch or short sha for a baseline
    rev: str
    baseline: bool
    state: str  # success, failed, queued, running; "" for baselines
    params: dict[str, str]  # every param, flattened
    metrics: dict[str, float]  # headline metrics, `stage.key`


def experiments(repo: Path) -> list[Experiment]:
    """The baseline commit and its experiments, as `dvc exp show --json` lists them."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=repo,
        env=dvc_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ExperimentError(f"dvc exp show failed:\n{proc.stderr.strip()}")
    # A metrics file's stage, as dvc.yaml names it (DVC keys them by path).
    stages = {path.relative_to(repo).as_posix(): stage for stage, path in metric_files(repo).items()}
    out = []
    for commit in json.loads(proc.stdout or "[]"):
        if commit.get("rev") == "workspace":
            continue
        out.append(_experiment(commit, commit.get("name") or commit["rev"][:7], True, "", stages))
        for entry in commit.get("experiments") or []:
            state = (entry.get("executor") or {}).get("state") or "success"
            for rev in entry.get("revs") or []:
                out.append(_experiment(rev, entry.get("name") or rev["rev"][:7], False, state, stages))
    return out


def _experiment(entry: dict, name: str, baseline: bool, state: str, stages: dict[str, str]) -> Experiment:
    data = entry.get("data") or {}
    params = flatten("", (data.get("params") or {}).get("params.yaml", {}).get("data") or {})
    files = {
        stages.get(path, Path(path).stem): found.get("data") or {}
        for path, found in (data.get("metrics") or {}).items()
    }
    return Experiment(name, entry.get("rev", "")[:7], baseline, state, params, metric_numbers(files))


SHOWN_METRICS = (
    "evaluate.psnr",
    "evaluate.ssim",
    "evaluate.rfid",
    "evaluate.codebook_usage",
    "evaluate.fid",
    "evaluate.class_consistency",
    "evaluate.prompt_consistency",  # text priors only: a column when some row has it
    "train_prior.val_bits_per_token",
)


def table(rows: list[Experiment], metrics: tuple[str, ...] = SHOWN_METRICS) -> str:
    """A markdown table: each experiment, its state, the params that differ between the rows,
    and the headline metrics any row has."""
    keys = sorted({k for r in rows for k in r.params if len({r2.params.get(k) for r2 in rows}) > 1})
    shown = [m for m in metrics if any(m in r.metrics for r in rows)]
    head = ["experiment", "rev", "state", *keys, *shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [("" if r.baseline else "└ ") + r.name, r.rev, r.state or "baseline"]
        cells += [r.params.get(k, "") for k in keys]
        cells += [f"{r.metrics[m]:.4g}" if m in r.metrics else "" for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
