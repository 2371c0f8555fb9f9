"""DVC, the single source of truth for staleness: stage status and `dvc repro` of one stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from pipelines import weights_fingerprint as weights_stage
from pipelines.lifecycle import guarded, owner_env, stop_group
from pipelines.runtime import Paths
from pipelines.source_fingerprint import describe_change

FINGERPRINT_STAGE = "source_fingerprint"
WEIGHTS_STAGE = "weights_fingerprint"
LISTING_STAGES = (FINGERPRINT_STAGE, WEIGHTS_STAGE)  # always_changed: they list, cheaply, what DVC cannot hash
STAGES = (*LISTING_STAGES, "shard", "train_tokenizer", "tokenize", "export", "train_prior", "sample", "evaluate")
TRAINING_STAGES = ("train_tokenizer", "train_prior")  # they checkpoint: retried, resumed, their checkpoints gc'd


def listing_stages(chosen: Iterable[str]) -> set[str]:
    """The listing stages that go with `chosen`: without a current listing, DVC cannot tell
    whether the stages reading it are stale."""
    chosen = set(chosen)
    return ({FINGERPRINT_STAGE} if "shard" in chosen else set()) | (
        {WEIGHTS_STAGE} if chosen & set(weights_stage.WEIGHTS) else set()
    )


def stage_status(repo: str | Path, stage: str | None = None) -> dict[str, list[str]]:
    """Stale stages with DVC's reasons, e.g. {"train_prior": ["params changed: train_prior.lr"]}.

    An up-to-date stage is absent. Upstream stages are not followed: each stage is judged on its
    own deps, as `dvc repro --single-item` will judge it."""
    # The CLI rather than dvc.repo.Repo: DVC's API assumes the process's cwd is the repo root.
    cmd = [sys.executable, "-m", "dvc", "status", "--json", *([stage] if stage else [])]
    proc = subprocess.run(cmd, cwd=repo, env=dvc_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status failed in {repo}:\n{proc.stderr.strip()}")
    raw = json.loads(proc.stdout or "{}")
    stale = {name.removeprefix("dvc.yaml:"): _reasons(entries) for name, entries in raw.items()}
    if stage in LISTING_STAGES:  # it runs anyway: no need to list twice
        return {stage: ["lists on every run"]}
    if stale.get(FINGERPRINT_STAGE) == ["always changed"]:
        # DVC says so of every always_changed stage; whether the source changed is ours to say.
        change = source_change(repo)
        if change is None:
            del stale[FINGERPRINT_STAGE]
        else:
            stale[FINGERPRINT_STAGE] = [f"the source changed: {change}"]
            if stage is None:
                stale.setdefault("shard", []).append(f"its source changed since the last run ({change})")
    if stale.get(WEIGHTS_STAGE) == ["always changed"]:
        changes = weights_change(repo)
        if not changes:
            del stale[WEIGHTS_STAGE]
        else:
            stale[WEIGHTS_STAGE] = [f"weights files changed: {'; '.join(changes.values())}"]
            if stage is None:
                for reader, what in changes.items():
                    stale.setdefault(reader, []).append(f"its weights files changed since the last run ({what})")
    return stale


def _listing(repo: str | Path, module: str) -> tuple[dict | None, str | None]:
    """(the listing `python -m module --print` makes now, None) or (None, why it could not)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--print"], cwd=repo, env=dvc_env(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def source_change(repo: str | Path) -> str | None:
    """How the shard stage's source differs from what data/source.json recorded at the last
    run, in words; None when it does not (a listing, not a read: see pipelines/source_fingerprint.py)."""
    recorded = Path(repo) / "data" / "source.json"
    new, error = _listing(repo, "pipelines.source_fingerprint")
    if new is None:
        return f"cannot list it: {error}"
    if not recorded.is_file():
        return "never listed before"
    old = json.loads(recorded.read_text())
    return None if old == new else describe_change(old, new)


def weights_change(repo: str | Path) -> dict[str, str]:
    """{stage: how its weights files differ from what data/weights recorded}; empty: they do not."""
    new, error = _listing(repo, "pipelines.weights_fingerprint")
    if new is None:
        return {stage: f"cannot hash them: {error}" for stage in weights_stage.WEIGHTS}
    return weights_stage.describe_change(weights_stage.recorded(Paths(repo)), new)


def missing_params(repo: str | Path) -> list[tuple[str, str]]:
    """Keys dvc.yaml tracks in params.yaml that params.yaml lacks. The typed params fill in
    defaults, but DVC refuses to run with a tracked key missing (and says so cryptically), so
    `vqpipe validate`/`run` name them first."""

    repo = Path(repo)
    if not (repo / "dvc.yaml").is_file() or not (repo / "params.yaml").is_file():
        return []
    stages = (yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages", {})
    raw = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    problems = []
    for stage, spec in stages.items():
        for key in spec.get("params", []):
            if not isinstance(key, str):
                continue  # {other_file.yaml: [...]}: not ours to check
            node = raw
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    problems.append(
                        (
                            key,
                            f"missing from params.yaml; dvc.yaml's stage {stage!r} tracks it "
                            "(add it back, e.g. with its default)",
                        )
                    )
                    break
                node = node[part]
    return problems


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The stages' `python` must be this interpreter (the project's venv), wherever PATH points."""
    env = {**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def downstream(repo: str | Path, stale: set[str]) -> dict[str, list[str]]:
    """Stages that read an output of a stale stage (directly or through others), with the
    stale stages they wait on: they rerun if those rewrite their outputs differently."""

    stages = yaml.safe_load((Path(repo) / "dvc.yaml").read_text())["stages"]

    def paths(stage: dict, key: str) -> set[str]:
        return {next(iter(e)) if isinstance(e, dict) else e for e in stage.get(key, [])}

    outs = {name: paths(st, "outs") | paths(st, "metrics") | paths(st, "plots") for name, st in stages.items()}
    waiting: dict[str, set[str]] = {name: set() for name in stages}
    for name in STAGES:  # DAG order: upstream waits are known before they are needed
        for upstream in STAGES[: STAGES.index(name)]:
            if outs[upstream] & paths(stages[name], "deps"):
                if upstream in stale:
                    waiting[name].add(upstream)
                waiting[name] |= waiting[upstream]
    return {name: sorted(w, key=STAGES.index) for name, w in waiting.items() if w and name not in stale}


def _reasons(entries) -> list[str]:
    reasons = []
    for entry in entries:
        if isinstance(entry, str):
            reasons.append(entry)
            continue
        for kind, changes in entry.items():
            if isinstance(changes, dict):
                for path, what in changes.items():
                    detail = ", ".join(f"{k}" for k in what) if isinstance(what, dict) else what
                    reasons.append(f"{kind}: {path} ({detail})")
            else:
                reasons.append(f"{kind}: {changes}")
    return reasons


def repro_stage(
    repo: str | Path, stage: str, env: dict[str, str], on_line: Callable[[str], None], force: bool = False
) -> bool:
    """`dvc repro --single-item STAGE`, streaming its output line by line.

    Returns whether DVC ran the stage's command (False: skipped as unchanged). Raises
    StageFailed, with the output's tail, when the stage fails."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    if force:
        cmd.append("--force")
    lines: list[str] = []
    # Its own process group, stopped whole when this process is (Ctrl-C, SIGTERM), and a
    # parent-death signal: `dvc repro` and its stage never outlive `vqpipe run`, even a kill -9.
    with subprocess.Popen(
        guarded(cmd),
        cwd=repo,
        env=dvc_env({**env, **owner_env()}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                on_line(line)
        except BaseException:
            stop_group(proc)
            raise
        code = proc.wait()
    if code != 0:
        raise StageFailed(stage, code, lines)
    return any(f"Running stage '{stage}'" in line for line in lines)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, lines: list[str]):
        self.stage, self.code, self.lines = stage, code, lines
        tail = "\n".join(lines[-25:])
        super().__init__(f"stage {stage!r} failed (dvc repro exit {code}); last output:\n{tail}")
