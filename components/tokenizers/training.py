"""One optimisation step of a tokenizer, whatever its architecture: reconstruction (L1/L2, +
LPIPS) and quantizer losses; for VQ-GAN the adaptive-weighted adversarial term and a
discriminator step, both only after `disc_start` steps. Around them the recipe of the field's
tokenizers: the learning-rate schedule, gradient clipping, gradient accumulation over
micro-batches (the quantizers learning once per step) and an EMA of the weights.

Usable with torch alone (a notebook, a benchmark): `build_step(cfg, image_size, device)` then
`step(images, n)` per batch. The training recipe (pipelines/recipes/tokenizer.py) adds the data,
checkpoints, validation and logging around it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch._functorch.config
from torch import nn

from components.config import TrainTokenizerConfig
from components.data.shards import to_float
from components.quantizers import deferred_updates
from components.schedules import lr_factor
from components.tokenizers.lpips import LPIPS, reconstruction_loss
from components.tokenizers.tokenizer import build_model, export_config
from components.tokenizers.vqgan import (
    LeCAM,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from components.weight_ema import WeightEMA


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
    compile-wrapped; `model`/`disc` are the plain modules; `weight_ema` averages `model`'s
    weights when `weight_ema_decay` is set, and `trained_model` is what is validated and exported.

    A batch is split into `grad_accum_steps` micro-batches whose gradients add up to the
    batch's (each loss scaled by 1 / grad_accum_steps); the quantizers learn from all of them
    once, after the last (`deferred_updates`), so EMA codebooks and dead-code counters move as
    they would for the whole batch."""

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
        self.opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.disc_lr = cfg.vqgan.disc_lr or cfg.lr
        self.opt_d = torch.optim.Adam(disc.parameters(), lr=self.disc_lr, betas=cfg.betas) if disc is not None else None
        self.lr_factor = lr_factor(cfg.lr_schedule, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        self.weight_ema = WeightEMA(model, cfg.weight_ema_decay) if cfg.weight_ema_decay else None

    @property
    def trained_model(self) -> nn.Module:
        """What training produces: the EMA of the weights when kept, else the model."""
        return self.weight_ema.model if self.weight_ema is not None else self.model

    def gan_active(self, step: int) -> bool:
        """Steps are counted from 1: with disc_start = k the discriminator first trains at step k + 1."""
        return self.disc is not None and step > self.cfg.vqgan.disc_start

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def _set_lr(self, step: int) -> None:
        """The schedule's rate for `step` (from 1) on both optimizers."""
        factor = self.lr_factor(step - 1)
        for group in self.opt_g.param_groups:
            group["lr"] = self.cfg.lr * factor
        if self.opt_d is not None:
            for group in self.opt_d.param_groups:
                group["lr"] = self.disc_lr * factor

    def _clip(self, module: nn.Module) -> torch.Tensor | None:
        if self.cfg.grad_clip is None:
            return None
        return torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.grad_clip)

    def step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step on a uint8 batch (b, 3, H, W); returns detached scalars for
        logging (means over the micro-batches)."""
        x = (to_float(images).to(self.device, non_blocking=True) * 2.0 - 1.0).contiguous(
            memory_format=torch.channels_last
        )
        accum = self.cfg.grad_accum_steps
        micro = x.chunk(accum) if accum > 1 else (x,)
        self._set_lr(step)
        gan = self.gan_active(step)
        self.opt_g.zero_grad(set_to_none=True)
        logged, fakes = [], []
        with deferred_updates(self.model) if accum > 1 else nullcontext():
            for i, batch in enumerate(micro):
                with _syncing(self.generator, i == len(micro) - 1):
                    parts, fake = self._generator_pass(batch, gan, 1.0 / len(micro))
                logged.append(parts)
                fakes.append(fake)
        grad_norm = self._clip(self.model)
        self.opt_g.step()
        if self.weight_ema is not None:
            self.weight_ema.update(self.model)
        parts = {k: torch.stack([p[k].float() for p in logged]).mean() for k in logged[0]}
        if grad_norm is not None:
            parts["grad_norm"] = grad_norm.detach()
        if gan:
            parts.update(self._disc_step(micro, fakes))
        return parts

    def _generator_pass(self, x: torch.Tensor, gan: bool, scale: float) -> tuple[dict, torch.Tensor]:
        """Forward and backward of one micro-batch, its loss scaled by `scale`; returns its
        logged parts and its (detached) reconstruction."""
        cfg = self.cfg
        with self._autocast():
            out = self.generator(x)
            rec = reconstruction_loss(cfg.recon_loss, out.reconstruction, x)
            parts = {"recon_loss": rec.detach()}
            if self.lpips is not None:
                perceptual = self.lpips(out.reconstruction.float(), x.float()).mean()
                rec = rec + cfg.perceptual_weight * perceptual
                parts["perceptual_loss"] = perceptual.detach()
        loss = rec + out.quant_loss
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
        (loss * scale).backward()
        parts = {"loss": loss.detach(), **parts, **{k: v for k, v in out.parts.items() if k not in parts}}
        return parts, out.reconstruction.detach()

    def _disc_step(self, reals: tuple[torch.Tensor, ...], fakes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.opt_d.zero_grad(set_to_none=True)
        logged, seen_real, seen_fake = [], [], []
        for i, (real, fake) in enumerate(zip(reals, fakes, strict=True)):
            with _syncing(self.discriminator, i == len(reals) - 1):
                parts, logits_real, logits_fake = self._disc_pass(real, fake, 1.0 / len(reals))
            logged.append(parts)
            seen_real.append(logits_real)
            seen_fake.append(logits_fake)
        if self.lecam is not None:  # its averages move once per step, over the whole batch
            self.lecam.update(torch.cat(seen_real), torch.cat(seen_fake))
        self._clip(self.disc)
        self.opt_d.step()
        return {k: torch.stack([p[k] for p in logged]).mean() for k in logged[0]}

    def _disc_pass(self, real: torch.Tensor, fake: torch.Tensor, scale: float):
        """Forward and backward of the discriminator on one micro-batch: its logged parts and
        its (detached) logits on the real and the reconstructed images."""
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
            parts["lecam_penalty"] = penalty.detach()
        (d_loss * scale).backward()
        return parts, logits_real.detach(), logits_fake.detach()

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.opt_g.state_dict()}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_optimizer=self.opt_d.state_dict())
        if self.lecam is not None:
            state["lecam"] = self.lecam.state_dict()
        if self.weight_ema is not None:
            state["weight_ema"] = self.weight_ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["optimizer"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["disc_optimizer"])
        if self.lecam is not None:
            self.lecam.load_state_dict(state["lecam"])
        if self.weight_ema is not None:
            # A checkpoint of a run that kept no average starts one from its weights.
            if "weight_ema" in state:
                self.weight_ema.load_state_dict(state["weight_ema"])
            else:
                self.weight_ema = WeightEMA(self.model, self.weight_ema.decay)


def _syncing(module: nn.Module, last: bool):
    """DDP all-reduces gradients on the last micro-batch's backward only (`no_sync` before)."""
    return nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()


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
