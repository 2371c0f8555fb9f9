"""What both training recipes share: the checkpoint file and its resume rules, every rank's
state gathered for it, and the end-of-training check that the replicas agree.

Resume rules: an unfinished checkpoint of the same training settings is resumed; one of other
settings is refused, naming them (`key: old -> new`); a finished one is extended when only
`steps` grew, and is the result again (no step trained) when the settings, the steps and the
code are the same: a stage retried after it finished does not train again. Otherwise the run
starts over (the finished run's result is the stage's output, and in DVC's cache).
A setting added after a checkpoint was written, or one that has stopped being a training
setting, does not stand in its way.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import components
import pipelines
from components.checkpoint import CheckpointMismatch, compare_settings, load_checkpoint, save_checkpoint
from components.config import RENAMED
from components.tokenizers import state_fingerprint

log = logging.getLogger("vqpipe.checkpoint")


@dataclass
class CheckpointFile:
    """The checkpoint of one training stage, and what a run must agree on to resume it."""

    directory: Path
    stage: str  # its params section: messages name the keys to change
    settings: dict  # the run's training settings (see TrainTokenizerConfig.training_settings)
    # A checkpoint's settings in today's terms, where an earlier version recorded them otherwise.
    upgrade: Callable[[dict], dict] | None = None

    def restorable(self, steps: int, device: torch.device, lead: bool) -> dict | None:
        """The state to resume a run of `steps` steps from, or None to start over (`lead`: this
        rank logs why). Raises CheckpointMismatch for an unfinished run of other settings."""
        state = load_checkpoint(self.directory, map_location=device)
        if state is None:
            return None
        saved = _current_names(self.stage, state["settings"])
        if self.upgrade is not None:
            saved = self.upgrade(saved)
        # A setting the checkpoint does not know was added since it was written: it cannot differ.
        # Nor can one that is no longer a training setting (ddp_workers, runtime since 0.8).
        saved = {k: v for k, v in _with_added(saved, self.settings).items() if k in self.settings}
        diffs = compare_settings(saved, self.settings)
        if state["complete"] and not diffs and state["step"] == steps and state.get("code") == code_fingerprint():
            # The stage ran to its end with these settings and this code (a retry after it
            # finished, a lost output): its result again, from the checkpoint, without training.
            if lead:
                log.info("%s holds this very run, finished (step %d): exporting it again", self.directory, steps)
            return state
        if state["complete"] and (diffs or state["step"] >= steps):
            if lead:
                log.info("%s holds a finished run (step %d); starting over", self.directory, state["step"])
            return None
        if diffs:
            raise CheckpointMismatch(
                f"{self.directory} holds an unfinished {self.stage} run (step {state['step']}) with other "
                "settings:\n  " + "\n  ".join(diffs) + f"\nTo resume it, set those back; to start over, delete "
                f"{self.directory} or set {self.stage}.resume: false."
            )
        if lead:
            log.info("resuming from %s at step %d", self.directory, state["step"])
        return state

    def save(self, state: dict[str, Any], step: int, complete: bool) -> None:
        state = {**state, "step": step, "complete": complete, "settings": self.settings, "code": code_fingerprint()}
        save_checkpoint(self.directory, state)


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the code that trains (every module of `components` and `pipelines`): a finished
    run is reused only by the code that made it."""
    digest = hashlib.sha256()
    for package in (components, pipelines):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _with_added(saved: dict, current: dict) -> dict:
    """`saved` with the settings it lacks taken from `current`, within nested sections too (a
    quantizer option added in 0.5 is missing from a 0.4 checkpoint's `quantizer`)."""
    out = dict(saved)
    for key, value in current.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _with_added(out[key], value)
    return out


def _current_names(stage: str, settings: dict) -> dict:
    """A checkpoint's settings under today's key names (a checkpoint of vqpipe 0.1 says `workers`)."""
    prefix = f"{stage}."
    renames = {old[len(prefix) :]: new[len(prefix) :] for old, new in RENAMED.items() if old.startswith(prefix)}
    return {renames.get(key, key): value for key, value in settings.items()}


def gather(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (a collective: all ranks call it)."""
    if world_size == 1:
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def replicas_identical(modules: dict[str, nn.Module | None], world_size: int) -> bool:
    """Whether every rank holds the same weights and buffers (EMA codebooks and their counts
    included): a sha256 of each rank's state, compared on all."""
    if world_size == 1:
        return True
    state = {
        f"{prefix}.{name}": tensor
        for prefix, module in modules.items()
        if module is not None
        for name, tensor in module.state_dict().items()
    }
    return len(set(gather(state_fingerprint({}, state), world_size))) == 1
