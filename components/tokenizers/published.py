"""Published tokenizers as vqpipe exports: LlamaGen's VQ models and taming-transformers' VQGANs.

    config, model, notes = convert_checkpoint("llamagen", "vq_ds16_c2i.pt", model="VQ-16")
    save_export("models/llamagen-vq16", config, model)      # then Tokenizer.load(...) as any other

Both references share one network (`network: taming` here); they differ in the names of its
tensors and in their codebooks (LlamaGen's l2-normalised 8-dimensional codes are `cosine: true`
codes of `latent_dim: 8`). The checkpoint is read with `torch.load(weights_only=True)`: nothing
in it can run code. Every tensor of the reference layout is consumed and its shape checked
against the model asked for; a missing or unknown tensor is an error naming it, and a checkpoint
of another configuration is refused naming what differs, before anything is written.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from components.config import TamingOptions, TrainTokenizerConfig
from components.data.shards import sha256_file
from components.quantizers import VQConfig
from components.tokenizers.tokenizer import build_model, export_config

FORMATS = ("llamagen", "taming")


@dataclass(frozen=True)
class PublishedModel:
    """One published configuration and what its authors report for it."""

    channels: int
    ch_mult: tuple[int, ...]
    codebook_size: int
    latent_dim: int  # the codebook's width (LlamaGen's codebook_embed_dim, taming's embed_dim)
    cosine: bool  # l2-normalised codes (LlamaGen's codebook_l2_norm)
    checkpoints: str  # the published files of this configuration
    rfid: str  # the published reconstruction FID, where it was measured
    num_res_blocks: int = 2
    z_channels: int = 256


MODELS: dict[str, dict[str, PublishedModel]] = {
    "llamagen": {
        "VQ-16": PublishedModel(
            128, (1, 1, 2, 2, 4), 16384, 8, True, "vq_ds16_c2i.pt, vq_ds16_t2i.pt", "2.19 on ImageNet val, 256 px"
        ),
        "VQ-8": PublishedModel(128, (1, 2, 2, 4), 16384, 8, True, "vq_ds8_c2i.pt", "0.59 on ImageNet val, 256 px"),
    },
    "taming": {
        "imagenet-f16-16384": PublishedModel(
            128, (1, 1, 2, 2, 4), 16384, 256, False, "vqgan_imagenet_f16_16384 (last.ckpt)", "4.98 on ImageNet val"
        ),
        "imagenet-f16-1024": PublishedModel(
            128, (1, 1, 2, 2, 4), 1024, 256, False, "vqgan_imagenet_f16_1024 (last.ckpt)", "7.94 on ImageNet val"
        ),
    },
}
DEFAULT_MODEL = {"llamagen": "VQ-16", "taming": "imagenet-f16-16384"}
# Where each format keeps its weights in the checkpoint file.
STATE_ENTRY = {"llamagen": "model", "taming": "state_dict"}
# Tensors of the reference layout that only training uses: consumed, checked, not kept.
TRAINING_ONLY = {
    "llamagen": re.compile(r"quantize\.codebook_used$"),  # a window of recently used codes
    "taming": re.compile(r"loss\."),  # the discriminator and the LPIPS network
}
# Our tensors no reference has: the quantizer's dead-code counters and its initialised flag.
OURS_ONLY = re.compile(r"quantizer\.(steps_unused|initialized)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message says why and what to do."""


def export_config_for(fmt: str, model: str, image_size: int) -> dict:
    """The vqpipe config.json of a published model at `image_size`: its settings as a
    TrainTokenizerConfig (attention at the coarsest level and in the middle, as both references
    place it; a codebook learned by gradient, no k-means, no restarts), exported as any other."""
    spec = MODELS[fmt][model]
    downsample = 2 ** (len(spec.ch_mult) - 1)
    if image_size % downsample:
        raise CheckpointError(f"--image-size {image_size} is not a multiple of {model}'s downsampling {downsample}")
    cfg = TrainTokenizerConfig(
        arch="vqgan",
        network="taming",
        channels=spec.channels,
        num_res_blocks=spec.num_res_blocks,
        downsample=downsample,
        latent_dim=spec.latent_dim,
        taming=TamingOptions(ch_mult=spec.ch_mult, z_channels=spec.z_channels),
        quantizer=VQConfig(
            codebook_size=spec.codebook_size, ema=False, cosine=spec.cosine, kmeans_iters=0, restart_after_steps=0
        ),
    )
    return export_config(cfg, image_size)


def reference_name(fmt: str, key: str, levels: int) -> str | None:
    """The name the reference gives our tensor `key` (None: a tensor only vqpipe has)."""
    if OURS_ONLY.match(key):
        return None
    if key == "quantizer.codebook":
        return "quantize.embedding.weight"
    key = re.sub(r"^encoder\.quant_conv\.", "quant_conv.", key)
    key = re.sub(r"^decoder\.post_quant_conv\.", "post_quant_conv.", key)
    key = key.replace(".shortcut.", ".nin_shortcut.")
    mid = {"block_1": "0", "attention": "1", "block_2": "2"} if fmt == "llamagen" else {"attention": "attn_1"}
    key = re.sub(r"\.mid\.(\w+)\.", lambda m: f".mid.{mid.get(m[1], m[1])}.", key)
    found = re.match(r"(encoder|decoder)\.levels\.(\d+)\.(blocks|attentions|resample)\.(.*)$", key)
    if not found:
        return key
    part, level, kind, rest = found[1], int(found[2]), found[3], found[4]
    if fmt == "llamagen":
        # LlamaGen's decoder lists its levels coarsest first; its encoder and taming's, finest first.
        index = levels - 1 - level if part == "decoder" else level
        group = "conv_blocks"
        kind = {"blocks": "res", "attentions": "attn"}.get(kind, kind)
    else:
        index, group = level, "down" if part == "encoder" else "up"
        kind = {"blocks": "block", "attentions": "attn"}.get(kind, kind)
    if kind == "resample":
        kind = "downsample" if part == "encoder" else "upsample"
    return f"{part}.{group}.{index}.{kind}.{rest}"


def read_checkpoint(path: str | Path, fmt: str) -> dict[str, torch.Tensor]:
    """The reference state dict in `path`: the file's `model` (LlamaGen) or `state_dict`
    (taming-transformers, Lightning) entry, or the file itself when it is a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = _load_weights_only(path)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # not a refused object: bytes that are no checkpoint
            detail = str(err).partition("WeightsUnpickler error:")[2].strip().split("\n")[0]
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (it does not unpickle: {detail})") from None
        entry = STATE_ENTRY[fmt]
        raise CheckpointError(
            f"{path} holds Python objects besides tensors (training arguments, callbacks, ...), and vqpipe "
            f"reads checkpoints with torch.load(weights_only=True), which runs no code from the file.\n"
            f"If you trust the file, keep only its weights, then import that:\n"
            f"  python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'{entry}': c['{entry}']}}, '{path.with_suffix('')}-weights.pt')\"\n"
            f"(refused: {str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {err}") from None
    # The format's own entry first; the other's too, so that a checkpoint given under the wrong
    # --format reaches the layout check, which says whose it is.
    for entry in (STATE_ENTRY[fmt], *STATE_ENTRY.values()):
        if isinstance(obj, dict) and isinstance(obj.get(entry), dict):
            obj = obj[entry]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} has no state dict where a {fmt} checkpoint keeps it (an entry '{STATE_ENTRY[fmt]}' of "
            f"tensors, or tensors alone); found: {keys}"
        )
    return obj


def _load_weights_only(path: Path):
    """torch.load(weights_only=True), memory-mapped (a 300 MB file is not read twice) unless the
    file predates the zip format, which cannot be mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _looks_like(state: dict[str, torch.Tensor]) -> str | None:
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
        return "taming"
    if any(k.startswith(("encoder.conv_blocks.", "decoder.conv_blocks.")) for k in state):
        return "llamagen"
    return None


def _describe(fmt: str, state: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """What a reference state dict says of its configuration (None where it cannot tell)."""

    def dim(key: str, axis: int) -> int | None:
        return int(state[key].shape[axis]) if key in state and state[key].ndim > axis else None

    group = "conv_blocks" if fmt == "llamagen" else "down"
    block = "res" if fmt == "llamagen" else "block"
    levels = {int(m[1]) for k in state if (m := re.match(rf"encoder\.{group}\.(\d+)\.", k))}
    blocks = {int(m[1]) for k in state if (m := re.match(rf"encoder\.{group}\.0\.{block}\.(\d+)\.", k))}
    return {
        "codebook_size": dim("quantize.embedding.weight", 0),
        "latent_dim": dim("quantize.embedding.weight", 1),
        "channels": dim("encoder.conv_in.weight", 0),
        "z_channels": dim("quant_conv.weight", 1),
        "levels": len(levels) or None,
        "num_res_blocks": len(blocks) or None,
    }


def _differences(fmt: str, model: str, state: dict[str, torch.Tensor]) -> list[str]:
    spec = MODELS[fmt][model]
    wanted = {
        "codebook_size": spec.codebook_size,
        "latent_dim": spec.latent_dim,
        "channels": spec.channels,
        "z_channels": spec.z_channels,
        "levels": len(spec.ch_mult),
        "num_res_blocks": spec.num_res_blocks,
    }
    found = _describe(fmt, state)
    return [
        f"{k}: {found[k]} in the checkpoint, {v} in {model}" for k, v in wanted.items() if found[k] not in (None, v)
    ]


def _matching_models(fmt: str, state: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in MODELS[fmt] if not _differences(fmt, name, state)]


def convert_state(
    fmt: str, model: str, state: dict[str, torch.Tensor], image_size: int = 256
) -> tuple[dict, nn.Module, list[str]]:
    """(config, the vqpipe model holding the weights, notes) for reference tensors `state` of
    published `model`. CheckpointError naming what differs, is missing or is unknown."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r} (allowed: {', '.join(FORMATS)})")
    other = _looks_like(state)
    if other is not None and other != fmt:
        raise CheckpointError(f"this is a {other} checkpoint, not a {fmt} one: use --format {other}")
    if model not in MODELS[fmt]:
        raise CheckpointError(f"unknown {fmt} model {model!r} (allowed: {', '.join(MODELS[fmt])})")
    differences = _differences(fmt, model, state)
    if differences:
        matching = _matching_models(fmt, state)
        hint = f"; it matches {', '.join(matching)}: pass --model {matching[0]}" if matching else ""
        raise CheckpointError(f"the checkpoint is not {fmt} {model}: " + "; ".join(differences) + hint)

    config = export_config_for(fmt, model, image_size)
    built = build_model(config)
    ours = built.state_dict()
    levels = len(MODELS[fmt][model].ch_mult)
    names = {key: reference_name(fmt, key, levels) for key in ours}
    expected = {ref: key for key, ref in names.items() if ref is not None}
    training_only = sorted(k for k in state if k not in expected and TRAINING_ONLY[fmt].match(k))
    missing = sorted(ref for ref in expected if ref not in state)
    unknown = sorted(k for k in state if k not in expected and k not in training_only)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:10])}")
    if unknown:
        problems.append(f"{len(unknown)} unknown tensor(s): {', '.join(unknown[:10])}")
    for ref, key in expected.items():
        if ref in state and tuple(state[ref].shape) != tuple(ours[key].shape):
            problems.append(f"{ref}: shape {tuple(state[ref].shape)}, {model} has {tuple(ours[key].shape)}")
    if problems:
        raise CheckpointError(f"the checkpoint does not match {fmt} {model}:\n  " + "\n  ".join(problems[:20]))

    converted = {}
    for key, tensor in ours.items():
        ref = names[key]
        if ref is None:  # vqpipe's own counters: a published codebook is initialised and has no dead codes
            converted[key] = torch.ones_like(tensor) if key.endswith("initialized") else torch.zeros_like(tensor)
        else:
            converted[key] = state[ref].detach().to(tensor.dtype).contiguous().clone()
    built.load_state_dict(converted)
    notes = [f"{len(expected)} tensors converted"]
    if training_only:
        notes.append(f"{len(training_only)} training-only tensors checked and left out ({training_only[0]}, ...)")
    return config, built, notes


def convert_checkpoint(
    fmt: str, path: str | Path, model: str | None = None, image_size: int = 256
) -> tuple[dict, nn.Module, list[str]]:
    """Read `path` (see `read_checkpoint`) and convert it (see `convert_state`, which checks the
    format once it is read); the config records where it came from."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r} (allowed: {', '.join(FORMATS)})")
    model = model or DEFAULT_MODEL[fmt]
    config, built, notes = convert_state(fmt, model, read_checkpoint(path, fmt), image_size)
    config["imported_from"] = {"format": fmt, "model": model, "file": Path(path).name, "sha256": sha256_file(path)}
    return config, built, notes
