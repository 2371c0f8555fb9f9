"""Training checkpoints: one file holding the whole training state, written atomically.

`checkpoint.pt` is a `torch.save` of plain containers and tensors (model and optimizer state
dicts, RNG states as tensors, numbers, strings) and is read back with
`torch.load(weights_only=True)`, which refuses anything that would run code: a checkpoint
someone hands over cannot execute anything. It is replaced (write to a temporary name, fsync,
rename) every `checkpoint_every` steps, so a kill at any moment leaves the previous one whole.

Each checkpoint records the run's training settings; `compare_settings` names the ones that
differ from the current run's.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.io import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


class CheckpointMismatch(ValueError):
    """A checkpoint written by a run with other training settings."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, Python), as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to directory/checkpoint.pt atomically; returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE

    def write(tmp: str) -> None:
        torch.save({"format": FORMAT, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    atomic_write(path, write)
    return path


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint in `directory`, or None when there is none."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated file, another format, or pickled code
        raise ValueError(
            f"{path} is not a readable vqpipe checkpoint ({type(err).__name__}: {err}); delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vqpipe checkpoint of format {FORMAT}; delete it to start over")
    return state


def _flat(prefix: str, obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: obj}


def compare_settings(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every setting that differs (nested keys dotted)."""
    a, b = _flat("", saved), _flat("", current)
    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<unset>") != b.get(k, "<unset>")
    ]
