"""One optimisation step of a tokenizer, whatever its architecture: reconstruction (L1/L2, +
LPIPS) and quantizer losses; for VQ-GAN the adaptive-weighted adversarial term and a
discriminator step, both only after `disc_start` steps.

Usable with torch alone (a notebook, a benchmark): `build_step(cfg, image_size, device)` then
`step(images, n)` per batch. The training recipe (pipelines/recipes/tokenizer.py) adds the data,
checkpoints, validation and logging around it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch._functorch.config
from torch import nn

from components.config import TrainTokenizerConfig
from components.data.shards import to_float
from components.tokenizers.lpips import LPIPS, reconstruction_loss
from components.tokenizers.tokenizer import build_model, export_config
from components.tokenizers.vqgan import (
    LeCAM,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)


class Critics(NamedTuple):
    """What judges the reconstructions besides the pixel loss: VQ-GAN's discriminator (with
    LeCAM's regulariser) and the LPIPS network; each None when not in use."""

    disc: nn.Module | None = None
    lpips: LPIPS | None = None
    lecam: LeCAM | None = None


class TokenizerStep:
    """The optimisation step of every architecture: reconstruction (L1/L2, + LPIPS) and
    quantizer losses; for VQ-GAN the adaptive-weighted adversarial term and a discriminator
    step, both only after `disc_start` steps. `generator`/`discriminator` may be DDP- or
    compile-wrapped; `model`/`disc` are the plain modules."""

    def __init__(
        self,
        cfg: TrainTokenizerConfig,
        model: nn.Module,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        critics: Critics | None = None,
    ):
        disc, self.lpips, self.lecam = critics or Critics()
        self.cfg = cfg
        self.model = self.generator = model
        self.disc = self.discriminator = disc
        self.device = device
        self.amp_dtype = amp_dtype
        gan = cfg.arch == "vqgan"
        betas = (0.5, 0.9) if gan else (0.9, 0.999)  # taming-transformers' betas for GAN training
        self.opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
        self.opt_d = (
            torch.optim.Adam(disc.parameters(), lr=cfg.vqgan.disc_lr or cfg.lr, betas=betas)
            if disc is not None
            else None
        )

    def gan_active(self, step: int) -> bool:
        """Steps are counted from 1: with disc_start = k the discriminator first trains at step k + 1."""
        return self.disc is not None and step > self.cfg.vqgan.disc_start

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One step on a uint8 batch (b, 3, H, W); returns detached scalars for logging."""
        cfg = self.cfg
        x = (to_float(images).to(self.device, non_blocking=True) * 2.0 - 1.0).contiguous(
            memory_format=torch.channels_last
        )
        with self._autocast():
            out = self.generator(x)
            rec = reconstruction_loss(cfg.recon_loss, out.reconstruction, x)
            parts = {"recon_loss": rec.detach()}
            if self.lpips is not None:
                perceptual = self.lpips(out.reconstruction.float(), x.float()).mean()
                rec = rec + cfg.perceptual_weight * perceptual
                parts["perceptual_loss"] = perceptual.detach()
        loss = rec + out.quant_loss
        gan = self.gan_active(step)
        if gan:
            self.disc.requires_grad_(False)
            with self._autocast():
                g_loss = generator_loss(cfg.vqgan.disc_loss, self.disc(out.reconstruction))
            weight = (
                adaptive_weight(rec, g_loss, self.model.last_layer, cfg.vqgan.adaptive_weight_max)
                * cfg.vqgan.disc_weight
            )
            loss = loss + weight * g_loss
            parts.update(g_loss=g_loss.detach(), adaptive_weight=weight)
            self.disc.requires_grad_(True)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        if gan:
            parts.update(self._disc_step(x, out.reconstruction.detach()))
        return {"loss": loss.detach(), **parts, **{k: v for k, v in out.parts.items() if k not in parts}}

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg.vqgan
        with self._autocast():
            # One forward of both halves: DDP expects one forward per backward (and GroupNorm
            # keeps the halves' statistics apart).
            logits = self.discriminator(torch.cat([real, fake.to(real.dtype)]))
        logits_real, logits_fake = logits.float().chunk(2)
        d_loss = discriminator_loss(cfg.disc_loss, logits_real, logits_fake)
        parts = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        if self.lecam is not None:
            penalty = self.lecam.penalty(logits_real, logits_fake)
            d_loss = d_loss + cfg.lecam_weight * penalty
            self.lecam.update(logits_real.detach(), logits_fake.detach())
            parts["lecam_penalty"] = penalty.detach()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        return parts

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.opt_g.state_dict()}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_optimizer=self.opt_d.state_dict())
        if self.lecam is not None:
            state["lecam"] = self.lecam.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["optimizer"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["disc_optimizer"])
        if self.lecam is not None:
            self.lecam.load_state_dict(state["lecam"])


def build_step(
    cfg: TrainTokenizerConfig,
    image_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    perceptual_weights: str | None = None,
) -> TokenizerStep:
    """The model of `cfg` for `image_size` images (built from its export config, as
    `Tokenizer.load` builds it), and for VQ-GAN its discriminator, on `device`. `amp_dtype`:
    bf16 autocast of the convolutions, or None (fp32). `perceptual_weights`: the LPIPS file
    when it moved since `cfg` named it (Ray workers get an absolute path)."""
    # channels_last: ~20% faster convolutions (oneDNN, tensor cores).
    model = build_model(export_config(cfg, image_size)).to(device, memory_format=torch.channels_last)
    disc = lecam = lpips = None
    if cfg.arch == "vqgan":
        disc = PatchDiscriminator(3, cfg.vqgan.disc_channels, cfg.vqgan.disc_layers)
        disc = disc.to(device, memory_format=torch.channels_last)
        if cfg.vqgan.lecam_weight > 0:
            lecam = LeCAM(cfg.vqgan.lecam_decay).to(device)
    if cfg.perceptual_weight > 0:
        lpips = LPIPS.load(perceptual_weights or cfg.perceptual_weights).to(device)
    return TokenizerStep(cfg, model, device, amp_dtype, Critics(disc, lpips, lecam))


def compile_convolutions(step: TokenizerStep) -> None:
    """torch.compile the convolutional parts in place (`Module.compile`: state-dict names, and so
    checkpoints and exports, stay the same). The quantizers stay eager: their search is no-grad,
    data-dependent and fp32 by design, and inductor in torch 2.13 fails on it."""
    quantizers = set(map(id, step.model.quantizers.values()))
    for child in step.model.children():
        if id(child) not in quantizers:
            child.compile()
    if step.disc is not None:
        # The adaptive weight differentiates the reconstruction and adversarial losses with
        # retain_graph=True, which compiled backwards with donated buffers refuse.
        torch._functorch.config.donated_buffer = False
        step.disc.compile()
