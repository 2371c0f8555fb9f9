"""How a stage runs on this machine: project paths, logging, the entry point, devices,
precision and seeding. Nothing here changes what a stage produces."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from components.config import ConfigError, Params, load_params
from components.data.units import SourceError
from pipelines.lifecycle import die_with_parent, exit_on_signals, watch_ancestors


class Paths:
    """Where the stages read and write, relative to a project root (the DVC repo)."""

    def __init__(self, root: str | Path = "."):
        root = Path(root)
        self.root = root
        self.shards = root / "data" / "shards"
        self.source_fingerprint = root / "data" / "source.json"
        self.weights = root / "data" / "weights"  # the weights files params name, by content
        self.tokens = root / "data" / "tokens"
        self.lm = root / "data" / "lm"  # the export stage's: what a language model trains on
        self.tokenizer = root / "models" / "tokenizer"
        self.prior = root / "models" / "prior"
        self.samples = root / "samples"
        self.eval = root / "eval"
        self.metrics = root / "metrics"
        self.plots = root / "plots"

    def within(self, path: str | Path) -> Path:
        """`path` as given when absolute, else under the project root (absolute either way)."""
        path = Path(path)
        return path if path.is_absolute() else (self.root / path).resolve()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(section: str | None, run: Callable, params_path: str = "params.yaml") -> None:
    """Entry point of `python -m pipelines.<stage>`: `run` gets the params' `section` (None: all
    of them); params errors, and a source that cannot be used as configured, exit 2 before any
    work."""
    setup_logging()
    exit_on_signals()  # SIGTERM unwinds like Ctrl-C: Ray shut down, temporaries removed
    die_with_parent()  # and it comes when `dvc repro` (or the shell it runs the stage in) dies,
    watch_ancestors()  # however it dies
    try:
        params: Params = load_params(params_path)
        run(getattr(params, section) if section else params)
    except (ConfigError, SourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto|fp32|bf16) on `device`; None means fp32.

    auto picks bf16 only where it is computed natively: emulated bf16 is slower than fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_native_bf16() else None


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
