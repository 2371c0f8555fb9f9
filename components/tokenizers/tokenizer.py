"""The standalone tokenizer: `Tokenizer.load(path)`, `encode`, `decode`, `fingerprint`.

An export is a directory with `config.json` (architecture and quantizer settings) and
`model.safetensors` (weights, never pickled). Usable with torch alone:

    tok = Tokenizer.load("models/tokenizer")
    indices = tok.encode(images)        # (b, 3, H, W) float in [0, 1] -> (b, h, w) int64
    images = tok.decode(indices)        # -> (b, 3, H, W) float in [0, 1]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components import __version__
from components.io import atomic_write, write_json
from components.quantizers import QUANTIZERS
from components.tokenizers.vqvae import VQVAE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def state_fingerprint(config: dict, state: dict[str, torch.Tensor]) -> str:
    """sha256 of the canonical config and every tensor (name, dtype, shape, bytes), sorted by name.

    Independent of how the file was serialised, so the same weights always give the same value."""
    h = hashlib.sha256(_canonical({k: v for k, v in config.items() if k != "vqpipe_version"}))
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(_canonical([name, str(tensor.dtype), list(tensor.shape)]))
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def build_model(config: dict) -> VQVAE:
    if config.get("arch") != "vqvae":
        raise ValueError(f"unknown tokenizer arch {config.get('arch')!r} in config (allowed: vqvae)")
    quant = dict(config["quantizer"])
    kind = quant.get("type")
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer type {kind!r} in config (allowed: {', '.join(sorted(QUANTIZERS))})")
    return VQVAE(
        quantizer=QUANTIZERS[kind].model_validate(quant),
        channels=config["channels"],
        num_downsamples=config["num_downsamples"],
        num_res_blocks=config["num_res_blocks"],
        latent_dim=config["latent_dim"],
    )


class Tokenizer:
    """A trained VQ tokenizer in eval mode. Images are (b, 3, H, W) floats in [0, 1]."""

    def __init__(self, model: VQVAE, config: dict, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.config = config
        self.device = torch.device(device)
        self.fingerprint = state_fingerprint(config, model.state_dict())

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config["image_size"] // 2 ** self.config["num_downsamples"]
        return (side, side)

    @property
    def codebook_size(self) -> int:
        """Tokens lie in [0, codebook_size) (per group or stage for product and residual)."""
        return self.model.quantizer.codebook_size

    @property
    def tokens_per_position(self) -> int:
        """1, or the groups (product) / stages (residual) of each grid position."""
        return self.model.quantizer.tokens_per_position

    @property
    def token_columns(self) -> list[str]:
        """Parquet token columns: `tokens`, or one per group/stage (`tokens_group0`, ...)."""
        if self.tokens_per_position == 1:
            return ["tokens"]
        return [f"tokens_{name}" for name in self.model.quantizer.token_names]

    @property
    def index_shape(self) -> tuple[int, ...]:
        """Shape of one image's indices: (h, w), or (h, w, m) with m tokens per position."""
        m = self.tokens_per_position
        return self.grid if m == 1 else (*self.grid, m)

    @property
    def num_tokens(self) -> int:
        """Length of one image's flattened token sequence (what a prior models)."""
        h, w = self.grid
        return h * w * self.tokens_per_position

    def flatten(self, indices: torch.Tensor) -> torch.Tensor:
        """(b, *index_shape) -> (b, num_tokens). The documented order: raster over the grid
        (row by row), and within a position its m tokens in order (group 0..M-1, or stage 0
        (coarsest) .. N-1) before the next position's."""
        return indices.reshape(indices.shape[0], -1)

    def unflatten(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, num_tokens) -> (b, *index_shape): the inverse of `flatten`."""
        if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected token sequences of shape (b, {self.num_tokens}), got {tuple(tokens.shape)}")
        return tokens.reshape(tokens.shape[0], *self.index_shape)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [0, 1] -> (b, *index_shape) int64 code indices."""
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (b, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32) * 2.0 - 1.0
        return self.model.quantizer(self.model.encode_latent(x)).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(b, *index_shape) code indices -> (b, 3, H, W) in [0, 1]."""
        if indices.ndim != 1 + len(self.index_shape) or tuple(indices.shape[1:]) != self.index_shape:
            raise ValueError(f"expected indices of shape (b, {', '.join(map(str, self.index_shape))}), got {tuple(indices.shape)}")
        indices = indices.to(self.device, torch.long)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"indices outside [0, {self.codebook_size})")
        codes = self.model.quantizer.indices_to_codes(indices)
        return ((self.model.decode_codes(codes) + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def save(self, path: str | Path) -> str:
        """Write config.json and model.safetensors into `path`, each atomically; returns the fingerprint."""
        save_export(path, self.config, self.model)
        return self.fingerprint

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Tokenizer":
        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"not a tokenizer export: {p} is missing")
        config = json.loads(config_path.read_text())
        model = build_model(config)
        state = load_file(str(weights_path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights_path} does not match {config_path}: missing {missing}, unexpected {unexpected}")
        return cls(model, config, device)


def save_export(path: str | Path, config: dict, model: torch.nn.Module) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**config, "vqpipe_version": __version__}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    write_json(path / CONFIG_FILE, config)


def export_config(cfg, image_size: int) -> dict:
    """The config.json of a tokenizer trained with `cfg` (a TrainTokenizerConfig)."""
    return {
        "arch": cfg.arch,
        "image_size": image_size,
        "channels": cfg.channels,
        "num_downsamples": cfg.num_downsamples,
        "num_res_blocks": cfg.num_res_blocks,
        "latent_dim": cfg.latent_dim,
        "quantizer": cfg.quantizer.model_dump(),
    }
