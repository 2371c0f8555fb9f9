"""The standalone tokenizer: `Tokenizer.load(path)`, `encode`, `decode`, `fingerprint`.

An export is a directory with `config.json` (architecture and quantizer settings) and
`model.safetensors` (weights, never pickled). Usable with torch alone:

    tok = Tokenizer.load("models/tokenizer")
    indices = tok.encode(images)        # (b, 3, H, W) float in [0, 1] -> (b, h, w) int64
    images = tok.decode(indices)        # -> (b, 3, H, W) float in [0, 1]
    tokens = tok.flatten(indices)       # (b, num_tokens): the sequence a prior models

A hierarchical (vqvae2) tokenizer gives and takes a dict of indices per tier instead.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components import __version__
from components.io import replace_dir, write_json
from components.quantizers import QUANTIZERS
from components.tokenizers.blocks import ConvShape
from components.tokenizers.taming import TamingShape
from components.tokenizers.vqvae import SINGLE_TIER, VQVAE
from components.tokenizers.vqvae2 import VQVAE2

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


ARCHS = ("vqvae", "vqvae2", "vqgan")


def _quantizer(config: dict, where: str):
    quant = dict(config)
    kind = quant.get("type")
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer type {kind!r} in {where} (allowed: {', '.join(sorted(QUANTIZERS))})")
    return QUANTIZERS[kind].model_validate(quant)


NETWORKS = ("compact", "taming")


def network_shape(config: dict) -> ConvShape | TamingShape:
    """The encoder/decoder an export's config describes: the compact network (the only one
    before vqpipe 0.4, whose configs name none) or taming-transformers' / LlamaGen's."""
    network = config.get("network", "compact")
    if network == "compact":
        return ConvShape(*(config[k] for k in ConvShape._fields))
    if network == "taming":
        opts = config["taming"]
        return TamingShape(
            image_size=config["image_size"],
            channels=config["channels"],
            ch_mult=tuple(opts["ch_mult"]),
            num_res_blocks=config["num_res_blocks"],
            attn_resolutions=tuple(opts["attn_resolutions"]),
            mid_attention=opts["mid_attention"],
            z_channels=opts["z_channels"],
            latent_dim=config["latent_dim"],
            norm_groups=opts["norm_groups"],
        )
    raise ValueError(f"unknown tokenizer network {network!r} in config (allowed: {', '.join(NETWORKS)})")


def build_model(config: dict) -> nn.Module:
    """The architecture an export's config.json describes (`vqgan` exports its generator, a VQVAE)."""
    arch = config.get("arch")
    shape = network_shape(config)
    if arch in ("vqvae", "vqgan"):
        return VQVAE(_quantizer(config["quantizer"], "config quantizer"), shape)
    if arch == "vqvae2":
        if not isinstance(shape, ConvShape):
            raise ValueError("a vqvae2 tokenizer is built on the compact network only")
        return VQVAE2(
            _quantizer(config["quantizer"], "config quantizer"),
            _quantizer(config["top_quantizer"], "config top_quantizer"),
            shape,
            top_downsamples=int(math.log2(config["top_downsample"])),
        )
    raise ValueError(f"unknown tokenizer arch {arch!r} in config (allowed: {', '.join(ARCHS)})")


def _column_prefix(tier: str) -> str:
    return "tokens" if tier == SINGLE_TIER else f"tokens_{tier}"


class Tokenizer:
    """A trained VQ tokenizer in eval mode. Images are (b, 3, H, W) floats in [0, 1].

    Indices: for a one-tier tokenizer (vqvae, vqgan) a tensor (b, h, w), or (b, h, w, m) with
    m tokens per position (product groups, residual stages). For a hierarchical one (vqvae2) a
    dict tier -> such a tensor, tiers coarsest first (`tiers`: top, bottom). `flatten` turns
    either into the (b, num_tokens) sequence a prior models."""

    def __init__(self, model: nn.Module, config: dict, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.config = config
        self.device = torch.device(device)
        self.fingerprint = state_fingerprint(config, model.state_dict())

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def tiers(self) -> tuple[str, ...]:
        """Token tiers, coarsest first: ("single",) for one tier, ("top", "bottom") for vqvae2."""
        return tuple(self.model.tiers)

    @property
    def hierarchical(self) -> bool:
        return len(self.tiers) > 1

    def tier_grid(self, tier: str) -> tuple[int, int]:
        side = self.config["image_size"] // self.model.tier_downsample[tier]
        return (side, side)

    @property
    def grid(self) -> tuple[int, int]:
        """The finest tier's grid (the only one of a one-tier tokenizer)."""
        return self.tier_grid(self.tiers[-1])

    def _quantizer(self, tier: str):
        return self.model.quantizers[tier]

    @property
    def codebook_size(self) -> int:
        """Tokens lie in [0, codebook_size): the prior's vocabulary (the largest tier's
        codebook; per group or stage for product and residual)."""
        return max(self._quantizer(tier).codebook_size for tier in self.tiers)

    @property
    def tokens_per_position(self) -> int:
        """1, or the groups (product) / stages (residual) of each grid position (of the finest tier)."""
        return self._quantizer(self.tiers[-1]).tokens_per_position

    def tier_columns(self, tier: str) -> list[str]:
        q, prefix = self._quantizer(tier), _column_prefix(tier)
        return [prefix] if q.tokens_per_position == 1 else [f"{prefix}_{name}" for name in q.token_names]

    @property
    def token_columns(self) -> list[str]:
        """Parquet token columns, coarsest tier first: `tokens`, one per group/stage
        (`tokens_group0`, ...), or per tier (`tokens_top`, `tokens_bottom`, ...)."""
        return [c for tier in self.tiers for c in self.tier_columns(tier)]

    @property
    def column_grids(self) -> dict[str, tuple[int, int]]:
        return {c: self.tier_grid(tier) for tier in self.tiers for c in self.tier_columns(tier)}

    @property
    def column_codebook_sizes(self) -> dict[str, int]:
        return {c: self._quantizer(tier).codebook_size for tier in self.tiers for c in self.tier_columns(tier)}

    def tier_index_shape(self, tier: str) -> tuple[int, ...]:
        m = self._quantizer(tier).tokens_per_position
        return self.tier_grid(tier) if m == 1 else (*self.tier_grid(tier), m)

    @property
    def index_shape(self) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        """Shape of one image's indices: (h, w) or (h, w, m); a dict per tier when hierarchical."""
        shapes = {tier: self.tier_index_shape(tier) for tier in self.tiers}
        return shapes if self.hierarchical else shapes[self.tiers[0]]

    def _tier_tokens(self, tier: str) -> int:
        return math.prod(self.tier_index_shape(tier))

    @property
    def num_tokens(self) -> int:
        """Length of one image's flattened token sequence (what a prior models)."""
        return sum(self._tier_tokens(tier) for tier in self.tiers)

    def vocab_limits(self) -> torch.Tensor:
        """(num_tokens,) codebook size at each position of the flattened sequence: a tier with
        a smaller codebook than `codebook_size` must not be sampled past its own."""
        return torch.cat(
            [torch.full((self._tier_tokens(tier),), self._quantizer(tier).codebook_size) for tier in self.tiers]
        )

    def _as_tiers(self, indices) -> dict[str, torch.Tensor]:
        if isinstance(indices, dict):
            if set(indices) != set(self.tiers):
                raise ValueError(f"expected indices for tiers {list(self.tiers)}, got {list(indices)}")
            return indices
        if self.hierarchical:
            raise ValueError(f"a hierarchical tokenizer takes a dict of indices per tier ({', '.join(self.tiers)})")
        return {self.tiers[0]: indices}

    def _from_tiers(self, by_tier: dict[str, torch.Tensor]):
        return by_tier if self.hierarchical else by_tier[self.tiers[0]]

    def flatten(self, indices) -> torch.Tensor:
        """indices (see the class doc) -> (b, num_tokens). The documented order: tier by tier,
        coarsest first; within a tier raster over the grid (row by row), and within a position
        its m tokens in order (group 0..M-1, or stage 0 (coarsest) .. N-1) before the next
        position's."""
        by_tier = self._as_tiers(indices)
        return torch.cat([by_tier[tier].reshape(by_tier[tier].shape[0], -1) for tier in self.tiers], dim=1)

    def unflatten(self, tokens: torch.Tensor):
        """(b, num_tokens) -> indices: the inverse of `flatten`."""
        if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected token sequences of shape (b, {self.num_tokens}), got {tuple(tokens.shape)}")
        out, start = {}, 0
        for tier in self.tiers:
            n = self._tier_tokens(tier)
            out[tier] = tokens[:, start : start + n].reshape(tokens.shape[0], *self.tier_index_shape(tier))
            start += n
        return self._from_tiers(out)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (b, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )
        return images.to(self.device, torch.float32) * 2.0 - 1.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor):
        """(b, 3, H, W) in [0, 1] -> int64 indices (see the class doc)."""
        return self._from_tiers(self.model.encode_indices(self._check_images(images)))

    @torch.no_grad()
    def encode_columns(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(b, 3, H, W) in [0, 1] -> token column -> (b, h*w) indices, in `token_columns` order."""
        by_tier = self.model.encode_indices(self._check_images(images))
        out = {}
        for tier in self.tiers:
            idx = by_tier[tier].reshape(images.shape[0], -1, self._quantizer(tier).tokens_per_position)
            for i, column in enumerate(self.tier_columns(tier)):
                out[column] = idx[:, :, i]
        return out

    @torch.no_grad()
    def decode(self, indices) -> torch.Tensor:
        """indices (see the class doc) -> (b, 3, H, W) in [0, 1]."""
        by_tier = self._as_tiers(indices)
        checked = {}
        for tier in self.tiers:
            idx, shape = by_tier[tier], self.tier_index_shape(tier)
            where = f" of tier {tier!r}" if self.hierarchical else ""
            if idx.ndim != 1 + len(shape) or tuple(idx.shape[1:]) != shape:
                raise ValueError(
                    f"expected indices{where} of shape (b, {', '.join(map(str, shape))}), got {tuple(idx.shape)}"
                )
            size = self._quantizer(tier).codebook_size
            idx = idx.to(self.device, torch.long)
            if idx.numel() and (idx.min() < 0 or idx.max() >= size):
                raise ValueError(f"indices{where} outside [0, {size})")
            checked[tier] = idx
        return ((self.model.decode_indices(checked) + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def save(self, path: str | Path) -> str:
        """Write config.json and model.safetensors into `path`, each atomically; returns the fingerprint."""
        save_export(path, self.config, self.model)
        return self.fingerprint

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
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
    """The export directory, replaced as a unit: a reader never sees the weights of one export
    beside the config of another."""
    config = {**config, "vqpipe_version": __version__}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def fill(staging: Path) -> None:
        save_file(state, str(staging / WEIGHTS_FILE))
        write_json(staging / CONFIG_FILE, config)

    replace_dir(path, fill)


def export_config(cfg, image_size: int) -> dict:
    """The config.json of a tokenizer trained with `cfg` (a TrainTokenizerConfig). A compact
    network's names no network: its config, and so its fingerprint, is what vqpipe 0.3 wrote."""
    taming = cfg.taming
    network = (
        {
            "network": "taming",
            "taming": {
                "ch_mult": list(taming.resolved_ch_mult(cfg.downsample)),
                "attn_resolutions": list(taming.resolved_attn_resolutions(image_size, cfg.downsample)),
                "mid_attention": taming.mid_attention,
                "z_channels": taming.z_channels,
                "norm_groups": taming.norm_groups,
            },
        }
        if cfg.network == "taming"
        else {}
    )
    return {
        "arch": cfg.arch,
        "image_size": image_size,
        "channels": cfg.channels,
        "num_downsamples": cfg.num_downsamples,
        "num_res_blocks": cfg.num_res_blocks,
        "latent_dim": cfg.latent_dim,
        "quantizer": cfg.quantizer.model_dump(),
        **(
            {"top_downsample": cfg.vqvae2.top_downsample, "top_quantizer": cfg.top_quantizer.model_dump()}
            if cfg.arch == "vqvae2"
            else {}
        ),
        **network,
    }
