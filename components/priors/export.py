"""Building a prior for a tokenizer, and its export: `models/prior/{config.json, model.safetensors}`,
tied to the tokenizer (fingerprint, codebook sizes, grids)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components import __version__
from components.data.captions import TEXT_VOCAB
from components.io import atomic_write, write_json
from components.priors.maskgit import MaskGITPrior
from components.priors.transformer import HierarchicalPrior, PriorConfig, TransformerPrior, upgrade_state


class PriorMismatch(ValueError):
    """A prior trained on another tokenizer's tokens."""


def tier_layouts(tokenizer) -> list[tuple[str, tuple[int, int, int], int]]:
    """Per tier, coarsest first: (tier, (h, w, m), codebook size)."""
    out = []
    for tier in tokenizer.tiers:
        columns = tokenizer.tier_columns(tier)
        h, w = tokenizer.tier_grid(tier)
        out.append((tier, (h, w, len(columns)), max(tokenizer.column_codebook_sizes[c] for c in columns)))
    return out


def build_prior(
    tokenizer, num_classes: int = 0, kind: str = "ar", text_len: int = 0, **sizes
) -> TransformerPrior | HierarchicalPrior:
    """The prior for `tokenizer`'s tokens: one transformer over the flattened sequence (product
    and residual tokens in the documented order, a position's m tokens side by side, with a
    sub-token embedding), or for a two-tier tokenizer a HierarchicalPrior (kind ar only).
    `kind`: ar | maskgit; `text_len`: caption slots (UTF-8 bytes) of a text-conditional prior
    (no classes then); `sizes`: n_layer, n_head, n_embd, dropout, norm, tie_weights."""
    if text_len:
        sizes = {**sizes, "text_len": text_len, "text_vocab": TEXT_VOCAB}
    tiers = tier_layouts(tokenizer)
    if len(tiers) == 1:
        ((_, (h, w, m), vocab),) = tiers
        cfg = PriorConfig(
            vocab_size=vocab, seq_len=h * w * m, num_classes=num_classes, layout=((h, w, m),), kind=kind, **sizes
        )
        return MaskGITPrior(cfg) if kind == "maskgit" else TransformerPrior(cfg)
    if len(tiers) != 2:
        raise ValueError(f"priors handle one or two token tiers, not {len(tiers)}")
    if kind != "ar":
        raise ValueError(f"a {kind} prior models one token tier; this tokenizer has two (use kind ar)")
    (_, top_layout, top_vocab), (_, bottom_layout, bottom_vocab) = tiers
    top_len = top_layout[0] * top_layout[1] * top_layout[2]
    top = PriorConfig(vocab_size=top_vocab, seq_len=top_len, num_classes=num_classes, layout=(top_layout,), **sizes)
    bottom = replace(
        top,
        vocab_size=bottom_vocab,
        seq_len=bottom_layout[0] * bottom_layout[1] * bottom_layout[2],
        layout=(top_layout, bottom_layout),
        prefix_len=top_len,
        prefix_vocab=top_vocab,
    )
    return HierarchicalPrior(top, bottom)


def save_prior(
    path: str | Path,
    model,
    *,
    tokenizer_fingerprint: str,
    grid: dict[str, tuple[int, int]],
    class_names: list[str] | None,
    text: dict | None = None,
) -> None:
    """grid: token column -> (h, w) of the tokenizer the prior models (`Tokenizer.column_grids`);
    text: a text prior's captions (`vocabulary`, `max_caption_tokens`, `held_out_captions`)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, tmp))
    config = (
        {"hierarchical": model.configs()} if isinstance(model, HierarchicalPrior) else {"model": model.cfg.to_dict()}
    )
    write_json(
        path / "config.json",
        {
            **config,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "grid": {name: list(g) for name, g in grid.items()},
            "class_names": class_names,
            **({"text": text} if text else {}),
            "vqpipe_version": __version__,
        },
    )


def _model_from(meta: dict) -> TransformerPrior | HierarchicalPrior:
    if "hierarchical" in meta:
        h = meta["hierarchical"]
        return HierarchicalPrior(PriorConfig.from_dict(h["top"]), PriorConfig.from_dict(h["bottom"]))
    cfg = PriorConfig.from_dict(meta["model"])
    return MaskGITPrior(cfg) if cfg.kind == "maskgit" else TransformerPrior(cfg)


def _vocab_sizes(model) -> list[int]:
    if isinstance(model, HierarchicalPrior):
        return [model.top.cfg.vocab_size, model.bottom.cfg.vocab_size]
    return [model.cfg.vocab_size]


def load_prior(
    path: str | Path, device: str | torch.device = "cpu", tokenizer=None
) -> tuple[TransformerPrior | HierarchicalPrior, dict]:
    """Load a prior; with `tokenizer`, refuse one trained on other tokens (fingerprint,
    codebook sizes, sequence length, grids)."""
    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"not a prior export: {path / name} is missing")
    meta = json.loads((path / "config.json").read_text())
    model = _model_from(meta)
    if tokenizer is not None:
        problems = []
        if meta["tokenizer_fingerprint"] != tokenizer.fingerprint:
            problems.append(
                f"tokenizer fingerprint {meta['tokenizer_fingerprint'][:12]} != {tokenizer.fingerprint[:12]}"
            )
        expected = [vocab for _, _, vocab in tier_layouts(tokenizer)]
        if "model" in meta and len(expected) > 1:  # one model over a multi-tier sequence (older exports)
            expected = [tokenizer.codebook_size]
        if _vocab_sizes(model) != expected:
            problems.append(f"codebook sizes {_vocab_sizes(model)} != the tokenizer's {expected}")
        if model.seq_len != tokenizer.num_tokens:
            problems.append(f"{model.seq_len} tokens per image != {tokenizer.num_tokens}")
        grids = {name: list(g) for name, g in tokenizer.column_grids.items()}
        # Priors saved before per-column grids stored one [h, w].
        saved = meta["grid"] if isinstance(meta["grid"], dict) else {name: list(meta["grid"]) for name in grids}
        if saved != grids:
            problems.append(f"token grids {saved} != {grids}")
        if problems:
            raise PriorMismatch(f"prior {path} does not match the tokenizer: " + "; ".join(problems))
    model.load_state_dict(upgrade_state(load_file(str(path / "model.safetensors"))))
    return model.to(device).eval(), meta
