"""The project's artifacts on a DVC remote: the default remote, push after a run, pull, gc.

DVC's own remote configuration decides where artifacts go: any remote a team sets as default
in `.dvc/config` (S3, GCS, SSH, any fsspec store) is used as it is. A project with none gets a
local one, configured in `.dvc/config.local` (this machine only, never committed): a folder
outside the workspace, under VQPIPE_DVC_REMOTE_ROOT (default ~/.cache/vqpipe/dvc-remotes),
named by the project's first git commit, so every clone of the project on this machine shares
it (a content-addressed store: sharing is safe) and `vqpipe pull` in a fresh clone finds what
another pushed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flows.dvc import dvc_env

DEFAULT_REMOTE = "vqpipe-local"
REMOTE_ROOT_ENV = "VQPIPE_DVC_REMOTE_ROOT"


class RemoteError(RuntimeError):
    """A DVC remote command failed; the message holds DVC's own words."""


def _dvc(repo: Path, *args: str, on_line: Callable[[str], None] | None = None) -> str:
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=repo, env=dvc_env(), capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    if on_line:
        for line in out.splitlines():
            on_line(line)
    if proc.returncode != 0:
        raise RemoteError(f"`dvc {' '.join(args)}` failed in {repo} (exit {proc.returncode}):\n{out}")
    return proc.stdout


def default_remote(repo: str | Path) -> str | None:
    """The name of the project's default DVC remote, from any of DVC's config files; None: none."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "default"], cwd=repo, env=dvc_env(), capture_output=True, text=True
    )
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def local_remote_path(repo: str | Path) -> Path:
    """Where the project's default local remote lives (see the module docstring)."""
    root = os.environ.get(REMOTE_ROOT_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
        "vqpipe/dvc-remotes"
    )
    proc = subprocess.run(
        ["git", "rev-list", "--max-parents=0", "HEAD"], cwd=repo, capture_output=True, text=True, check=False
    )
    roots = sorted(proc.stdout.split())
    if proc.returncode == 0 and roots:
        key = f"project-{roots[0][:16]}"
    else:  # no commit yet: this workspace's own
        resolved = Path(repo).resolve()
        key = f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"
    return Path(root).expanduser().resolve() / key


def ensure_remote(repo: str | Path) -> tuple[str, str]:
    """The default remote's (name, url), configuring the local one when the project has none."""
    repo = Path(repo)
    name = default_remote(repo)
    if name is None:
        path = local_remote_path(repo)
        workspace = repo.resolve()
        if path == workspace or workspace in path.parents:
            raise RemoteError(
                f"{REMOTE_ROOT_ENV} puts the DVC remote inside the workspace ({path}); choose a folder outside it"
            )
        path.mkdir(parents=True, exist_ok=True)
        _dvc(repo, "remote", "add", "--local", "--default", "--force", DEFAULT_REMOTE, str(path))
        name = DEFAULT_REMOTE
    return name, _dvc(repo, "config", f"remote.{name}.url").strip()


def push(repo: str | Path, on_line: Callable[[str], None] | None = None) -> str:
    """Push every output `dvc.lock` records to the default remote; returns DVC's summary line."""
    return _transfer(repo, "push", on_line)


def pull(repo: str | Path, on_line: Callable[[str], None] | None = None) -> str:
    """Check out every output `dvc.lock` records, fetched from the default remote; returns DVC's
    summary line."""
    return _transfer(repo, "pull", on_line)


def _transfer(repo: str | Path, verb: str, on_line: Callable[[str], None] | None) -> str:
    name, url = ensure_remote(repo)
    if on_line:
        on_line(f"{verb} {'to' if verb == 'push' else 'from'} DVC remote {name} ({url})")
    out = _dvc(Path(repo), verb, "--remote", name, on_line=on_line)
    return out.strip().splitlines()[-1] if out.strip() else f"{verb}ed"


def gc(repo: str | Path, dry_run: bool, cloud: bool, keep: str, on_line: Callable[[str], None]) -> None:
    """`dvc gc` of the cache (and the default remote with `cloud`), keeping what the workspace
    and `keep` (commits | branches | workspace) use, and every experiment's outputs."""
    flags = {"commits": ["--all-commits"], "branches": ["--all-branches", "--all-tags"], "workspace": []}[keep]
    args = ["gc", "--workspace", "--all-experiments", *flags, "--force"]
    if cloud:
        name, _ = ensure_remote(repo)
        args += ["--cloud", "--remote", name]
    if dry_run:
        args.append("--dry")
    _dvc(Path(repo), *args, on_line=on_line)
