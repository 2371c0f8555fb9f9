"""Prior export: `models/prior/{config.json, model.safetensors}`, tied to its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components import __version__
from components.io import atomic_write, write_json
from components.priors.transformer import PriorConfig, TransformerPrior


class PriorMismatch(ValueError):
    """A prior trained on another tokenizer's tokens."""


def save_prior(path: str | Path, model: TransformerPrior, *, tokenizer_fingerprint: str, grid: dict[str, tuple[int, int]], class_names: list[str] | None) -> None:
    """grid: token column -> (h, w) of the tokenizer the prior models (`Tokenizer.column_grids`)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, tmp))
    write_json(
        path / "config.json",
        {
            "model": model.cfg.to_dict(),
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "grid": {name: list(g) for name, g in grid.items()},
            "class_names": class_names,
            "vqpipe_version": __version__,
        },
    )


def load_prior(path: str | Path, device: str | torch.device = "cpu", tokenizer=None) -> tuple[TransformerPrior, dict]:
    """Load a prior; with `tokenizer`, refuse one trained on other tokens (fingerprint, codebook, grid)."""
    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"not a prior export: {path / name} is missing")
    meta = json.loads((path / "config.json").read_text())
    cfg = PriorConfig.from_dict(meta["model"])
    if tokenizer is not None:
        problems = []
        if meta["tokenizer_fingerprint"] != tokenizer.fingerprint:
            problems.append(f"tokenizer fingerprint {meta['tokenizer_fingerprint'][:12]} != {tokenizer.fingerprint[:12]}")
        if cfg.vocab_size != tokenizer.codebook_size:
            problems.append(f"codebook size {cfg.vocab_size} != {tokenizer.codebook_size}")
        if cfg.seq_len != tokenizer.num_tokens:
            problems.append(f"{cfg.seq_len} tokens per image != {tokenizer.num_tokens}")
        grids = {name: list(g) for name, g in tokenizer.column_grids.items()}
        # Priors saved before per-column grids stored one [h, w].
        saved = meta["grid"] if isinstance(meta["grid"], dict) else {name: list(meta["grid"]) for name in grids}
        if saved != grids:
            problems.append(f"token grids {saved} != {grids}")
        if problems:
            raise PriorMismatch(f"prior {path} does not match the tokenizer: " + "; ".join(problems))
    model = TransformerPrior(cfg)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device).eval(), meta
