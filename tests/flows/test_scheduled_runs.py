"""One run at a time per project (the lock, its holder, a killed holder taken over), a failed
run told to a webhook, `vqpipe gc`'s dry run, and the pieces they are made of."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import mlflow
import pytest
import torch

from flows.lock import LOCK_FILE, ProjectBusy, current_holder, project_lock
from tests.flows.test_pipeline_e2e import ROOT, _make_repo

HOLD = """
import sys, time
from flows.lock import project_lock
with project_lock(sys.argv[1], command="the test's holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def holder(tmp_path):
    """A process holding the project lock of a fresh project; yields (repo, process)."""
    repo = _make_repo(tmp_path / "repo")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(repo)], stdout=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path
    )
    assert proc.stdout.readline().strip() == "held"
    yield repo, proc
    proc.kill()
    proc.wait()


def test_run_no_wait_exits_3_naming_the_holder(holder):
    repo, proc = holder
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--repo", str(repo), "run", "--no-wait"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert out.returncode == 3, out.stderr
    assert f"pid {proc.pid}" in out.stderr and "the test's holder" in out.stderr and "since" in out.stderr
    assert "Prefect" not in out.stderr + out.stdout  # refused before the flow started
    assert time.perf_counter() - started < 60
    assert current_holder(repo)["pid"] == proc.pid


def test_a_waiting_run_says_for_whom_then_takes_over_a_killed_holders_lock(holder, caplog):
    repo, proc = holder
    said: list[str] = []
    with pytest.raises(ProjectBusy, match=f"pid {proc.pid}"):
        with project_lock(repo, wait=False):
            pass
    threading.Timer(1.0, proc.send_signal, [signal.SIGKILL]).start()  # kill -9: no chance to let go
    with caplog.at_level(logging.WARNING, logger="vqpipe.lock"):
        with project_lock(repo, wait=True, command="second", on_wait=said.append) as mine:
            assert current_holder(repo) == mine and mine["pid"] == os.getpid()
            with project_lock(repo, wait=False):  # the same process: reentrant, not a deadlock
                pass
    assert len(said) == 1 and f"held by pid {proc.pid}" in said[0]
    assert any("took over" in r.message and str(proc.pid) in r.message for r in caplog.records)
    assert current_holder(repo) is None and (repo / LOCK_FILE).read_text() == ""  # let go of cleanly


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_failed_run_is_posted_to_the_webhook(tmp_path, prefect_api, mlflow_store):
    """A stage fails (an unreadable shard, no retries): the flow fails, its MLflow parent run is
    FAILED, and the webhook on loopback receives the flow run, the stage and the error."""
    from flows.dvc import StageFailed
    from flows.pipeline import pipeline

    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hooks/secret-token"
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "broken.tar").write_bytes(b"not a tar archive" * 100)
    repo = _make_repo(
        tmp_path / "repo",
        shard={"source": f"webdataset:{tmp_path / 'corpus' / 'broken.tar'}", "retries": 0},
        pipeline={"notify_url": url},
    )
    mlflow.set_tracking_uri(mlflow_store)
    try:
        with pytest.raises(StageFailed):
            pipeline(repo=str(repo), stages=["shard"])
    finally:
        server.shutdown()
    assert len(_Receiver.bodies) == 1
    body = _Receiver.bodies[0]
    assert body["status"] == "failed" and body["stage"] == "shard" and body["repo"] == str(repo)
    assert body["flow_run_id"] and "stage 'shard' failed" in body["text"]
    runs = mlflow.search_runs(
        experiment_names=["vqpipe"], filter_string="tags.`vqpipe.stage` = 'pipeline'", order_by=["start_time DESC"]
    )
    assert runs.iloc[0]["status"] == "FAILED"
    assert current_holder(repo) is None  # the lock went with the failed run


def test_gc_dry_run_lists_finished_checkpoints_and_keeps_them(tmp_path, capsys):
    from components.checkpoint import save_checkpoint
    from flows.cli import main

    repo = _make_repo(tmp_path / "repo")
    save_checkpoint(repo / "checkpoints/train_tokenizer", {"step": 8, "complete": True, "w": torch.zeros(2)})
    save_checkpoint(repo / "checkpoints/train_prior", {"step": 3, "complete": False, "w": torch.zeros(2)})
    assert main(["--repo", str(repo), "gc", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "checkpoint" in line]
    assert len(listed) == 1, listed  # the unfinished one stays: it resumes
    assert "would remove checkpoint" in listed[0] and "train_tokenizer: a finished run, step 8" in listed[0]
    assert (repo / "checkpoints/train_tokenizer/checkpoint.pt").exists()
    assert main(["--repo", str(repo), "gc"]) == 0
    assert not (repo / "checkpoints/train_tokenizer").exists() and (repo / "checkpoints/train_prior").exists()


def test_the_default_remote_is_outside_the_workspace_and_shared_by_clones(tmp_path, dvc_remotes):
    from flows.remote import DEFAULT_REMOTE, ensure_remote

    a = _make_repo(tmp_path / "a")
    subprocess.run(["git", "clone", "-q", str(a), str(tmp_path / "b")], check=True)
    name, url = ensure_remote(a)
    assert name == DEFAULT_REMOTE and Path(url).parent == dvc_remotes and Path(url).is_dir()
    assert "vqpipe-local" in (a / ".dvc/config.local").read_text()
    assert ensure_remote(tmp_path / "b") == (name, url)  # the same project: the same remote
    assert subprocess.run(["git", "status", "--porcelain"], cwd=a, capture_output=True, text=True).stdout == ""


def test_serve_takes_a_cron_or_an_interval():
    from flows.arguments import build_parser

    parser = build_parser("vqpipe")
    assert parser.parse_args(["serve", "--interval", "15m"]).interval == 900.0
    assert parser.parse_args(["serve", "--interval", "45"]).interval == 45.0
    assert parser.parse_args(["serve", "--cron", "0 3 * * *"]).interval is None
    for bad in (["serve", "--interval", "soon"], ["serve", "--interval", "0s"], ["serve"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
