"""Session-wide services, started once: a temporary MLflow store, a local Ray, a Prefect API.

Tiny configs everywhere: the whole suite must finish in minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from components.config import Params, parse_params  # noqa: E402
from pipelines.runtime import Paths

TINY = {
    "shard": {"num_images": 160, "image_size": 16, "samples_per_shard": 40, "val_fraction": 0.2},
    "train_tokenizer": {
        "channels": 8,
        "latent_dim": 8,
        "downsample": 4,
        "quantizer": {"type": "vq", "codebook_size": 16, "restart_after_steps": 5},
        "steps": 8,
        "batch_size": 16,
        "shuffle_buffer": 32,
        "loader_workers": 0,
        "val_every": 4,
        "log_every": 2,
    },
    "tokenize": {"batch_size": 32, "actors": 2},
    "train_prior": {
        "precision": "fp32",  # exact comparisons (DDP against one process): bf16 sums in other orders
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "optimizer": "muon",  # params.yaml's, so that resume and DDP tests cover it and the average
        "weight_ema_decay": 0.9,
        "steps": 8,
        "batch_size": 16,
        "warmup_steps": 2,
        "val_every": 4,
        "log_every": 2,
    },
    "sample": {"num_per_class": 2, "batch_size": 8},
    "evaluate": {"batch_size": 64, "num_samples": 48, "classifier_steps": 40, "write_npz": True},
}


@pytest.fixture(scope="session", autouse=True)
def dvc_remotes(tmp_path_factory):
    """The projects' default DVC remotes go to a temporary folder, never the user's cache."""
    from flows.remote import REMOTE_ROOT_ENV

    path = tmp_path_factory.mktemp("dvc-remotes")
    old = os.environ.get(REMOTE_ROOT_ENV)
    os.environ[REMOTE_ROOT_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(REMOTE_ROOT_ENV, None)
    else:
        os.environ[REMOTE_ROOT_ENV] = old


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Every MLflow call of the session goes to one temporary sqlite store."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}"
    yield os.environ["MLFLOW_TRACKING_URI"]
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session; subprocesses join it through RAY_ADDRESS."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = old


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _server(name: str, cmd: list[str], health: str, env: dict, log_path: Path):
    """`cmd` running (its own session, output to `log_path`) until `health` answers, for the
    block; stopped after it. RuntimeError with the log's tail when it does not start."""
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "w")  # noqa: SIM115 (closed after the server)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(health, timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {name} server did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server for the session (`prefect server start` on loopback, with its
    services: the scheduler fires deployments' runs), in a temporary home with its own
    database. This process and its subprocesses use it through PREFECT_API_URL."""
    import sys

    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # fire interval schedules promptly
    }
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"]
    with _server("Prefect", cmd, f"{url}/health", env, home / "server.log"):
        old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
        os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=str(home))
        try:
            with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(home)}):
                yield url
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server for the session (`mlflow server` on loopback, a temporary
    sqlite backend and artifact store, artifacts served through it): its URL. The session's
    other tests keep the sqlite store; a test points MLFLOW_TRACKING_URI here itself."""
    import sys

    home = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        *("server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}"),
        *("--artifacts-destination", str(home / "artifacts")),
    ]
    url = f"http://127.0.0.1:{port}"
    with _server("MLflow", cmd, f"{url}/health", {**os.environ}, home / "server.log"):
        yield url


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return parse_params(TINY)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, tiny_params, ray_cluster):
    """The stages run once, in order, on the tiny config; results by stage name."""
    from pipelines import evaluate, lm_export, sample, shard, tokenize, train_prior, train_tokenizer

    paths = Paths(tmp_path_factory.mktemp("project"))
    results = {
        "shard": shard.run(tiny_params.shard, paths),
        "train_tokenizer": train_tokenizer.run(tiny_params.train_tokenizer, paths),
        "tokenize": tokenize.run(tiny_params.tokenize, paths),
        "export": lm_export.run(tiny_params.export, paths),
        "train_prior": train_prior.run(tiny_params.train_prior, paths),
        "sample": sample.run(tiny_params.sample, paths),
        "evaluate": evaluate.run(tiny_params.evaluate, paths),
    }
    return paths, results
