"""DVC, the single source of truth for staleness: stage status and `dvc repro` of one stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

STAGES = ("shard", "train_tokenizer", "tokenize", "train_prior", "sample", "evaluate")


def stage_status(repo: str | Path, stage: str | None = None) -> dict[str, list[str]]:
    """Stale stages with DVC's reasons, e.g. {"train_prior": ["params changed: train_prior.lr"]}.

    An up-to-date stage is absent. Upstream stages are not followed: each stage is judged on its
    own deps, as `dvc repro --single-item` will judge it."""
    # The CLI rather than dvc.repo.Repo: DVC's API assumes the process's cwd is the repo root.
    cmd = [sys.executable, "-m", "dvc", "status", "--json", *([stage] if stage else [])]
    proc = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status failed in {repo}:\n{proc.stderr.strip()}")
    raw = json.loads(proc.stdout or "{}")
    return {name.removeprefix("dvc.yaml:"): _reasons(entries) for name, entries in raw.items()}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The stages' `python` must be this interpreter (the project's venv), wherever PATH points."""
    env = {**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


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


def repro_stage(repo: str | Path, stage: str, env: dict[str, str], on_line: Callable[[str], None], force: bool = False) -> tuple[bool, list[str]]:
    """`dvc repro --single-item STAGE`, streaming its output line by line.

    Returns (whether DVC ran the stage's command, the output lines). Raises StageFailed when the
    stage fails."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    if force:
        cmd.append("--force")
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=repo, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            on_line(line)
        code = proc.wait()
    if code != 0:
        raise StageFailed(stage, code, lines)
    ran = any(f"Running stage '{stage}'" in line for line in lines)
    return ran, lines


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, lines: list[str]):
        self.stage, self.code, self.lines = stage, code, lines
        tail = "\n".join(lines[-25:])
        super().__init__(f"stage {stage!r} failed (dvc repro exit {code}); last output:\n{tail}")
