"""VQ-GAN's adversarial part (Esser et al., 2021): a PatchGAN discriminator, its losses, the
adaptive adversarial weight and LeCAM regularisation (Tseng et al., 2021).

The generator is the VQ autoencoder (`VQVAE`); `arch: vqgan` trains it against a
`PatchDiscriminator` once `disc_start` steps have passed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from components.quantizers.base import all_reduce_sum, distributed

DISC_LOSSES = ("hinge", "non_saturating")


def _mean_over_replicas(value: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return value
    return all_reduce_sum(value.clone()) / dist.get_world_size()


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN: (b, 3, H, W) -> (b, 1, H/2^n - 2, W/2^n - 2) logits, one per
    overlapping patch. GroupNorm rather than BatchNorm: per-sample statistics do not mix real
    and fake batches, and replicas need no synchronised batch statistics."""

    def __init__(self, in_channels: int, channels: int, layers: int):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers):
            prev, mult = mult, min(2**n, 8)
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, 2, 1, bias=False),
                nn.GroupNorm(8, channels * mult),
                nn.LeakyReLU(0.2),
            ]
        prev, mult = mult, min(2**layers, 8)
        seq += [
            nn.Conv2d(channels * prev, channels * mult, 4, 1, 1, bias=False),
            nn.GroupNorm(8, channels * mult),
            nn.LeakyReLU(0.2),
        ]
        seq += [nn.Conv2d(channels * mult, 1, 4, 1, 1)]
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def min_image_size(layers: int) -> int:
    """Smallest (power-of-two) image a `layers`-layer PatchGAN still gives patches for."""
    return 2 ** (layers + 2)


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]; non-saturating: E[softplus(-D(x))] +
    E[softplus(D(G(z)))]. Logits in, a scalar out (fp32)."""
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "non_saturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    raise ValueError(f"unknown discriminator loss {kind!r} (allowed: {', '.join(DISC_LOSSES)})")


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term: -E[D(G(z))] (hinge) or E[softplus(-D(G(z)))]."""
    fake = fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown discriminator loss {kind!r} (allowed: {', '.join(DISC_LOSSES)})")


def adaptive_weight(
    rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """||d rec / d W_last|| / (||d adv / d W_last|| + 1e-4), clamped to [0, max_weight] and
    detached; W_last is the decoder's last layer. Balances the two terms where they meet the
    image. Under torch.distributed the gradients are the replicas' mean (the gradients of the
    whole batch's losses, as one process would have them) before their norms are taken, so
    every replica uses the value one process would."""
    rec_grad = _mean_over_replicas(torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].float())
    adv_grad = _mean_over_replicas(torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0].float())
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class LeCAM(nn.Module):
    """LeCAM regulariser: E[relu(D(x) - a_fake)^2] + E[relu(a_real - D(G(z)))^2], with a_real,
    a_fake exponential moving averages of the discriminator's mean outputs. The averages are
    buffers (saved in checkpoints) and updated from the replicas' mean, so they stay identical."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        means = _mean_over_replicas(torch.stack([real.float().mean(), fake.float().mean()]))
        if not bool(self.initialised):
            self.ema_real.copy_(means[0])
            self.ema_fake.copy_(means[1])
            self.initialised.fill_(True)
        else:
            self.ema_real.lerp_(means[0], 1.0 - self.decay)
            self.ema_fake.lerp_(means[1], 1.0 - self.decay)

    def penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.relu(real.float() - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake.float()).pow(2).mean()
