"""Which training checkpoints `vqpipe gc` may drop.

A checkpoint exists to resume a killed training run. One that records a finished run
(`complete`) is only used again by a retry of that very run (same settings, steps and code: see
pipelines/recipes/checkpointing.py), which without it trains again; its stage's export is a DVC
output. So it may go; an unfinished one stays, whatever its age.
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.checkpoint import CHECKPOINT_FILE
from components.config import Params
from flows.dvc import TRAINING_STAGES


def finished_checkpoints(repo: Path, params: Params) -> list[tuple[str, Path, str]]:
    """(stage, checkpoint directory, why it may go) for each checkpoint of a finished run."""
    found = []
    for stage in TRAINING_STAGES:
        directory = Path(getattr(params, stage).checkpoint_dir)
        directory = directory if directory.is_absolute() else repo / directory
        path = directory / CHECKPOINT_FILE
        if not path.is_file():
            continue
        try:  # memory-mapped: only the few small entries read here leave the disk
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # unreadable: not ours to judge; a rerun says what to do with it
            continue
        if isinstance(state, dict) and state.get("complete"):
            found.append((stage, directory, f"a finished run, step {state.get('step')}"))
    return found
