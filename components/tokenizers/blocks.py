"""Convolutional encoder/decoder blocks: residual blocks, stride-2 down, nearest-neighbour up."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=8, num_channels=channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: (b, c_in, h, w) -> (b, c_out, h, w)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Downsample(nn.Module):
    """(b, c, h, w) -> (b, c, h/2, w/2) by a strided convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """(b, c, h, w) -> (b, c, 2h, 2w): nearest neighbour then a 3x3 conv (no checkerboard)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvShape(NamedTuple):
    """The shape of an encoder/decoder pair: `channels` at full resolution (doubling per
    downsampling, capped at 4x), `num_downsamples` stride-2 steps, `num_res_blocks` per
    resolution (the bottleneck always has one), and the `latent_dim` of the codes."""

    channels: int
    num_downsamples: int
    num_res_blocks: int
    latent_dim: int


def stage_channels(channels: int, num_downsamples: int) -> list[int]:
    """Width at each resolution: doubling per downsampling, capped at 4x the base width."""
    return [channels * min(2**i, 4) for i in range(num_downsamples + 1)]


class Encoder(nn.Module):
    """(b, 3, H, W) in [-1, 1] -> (b, latent_dim, H/2^n, W/2^n)."""

    def __init__(self, in_channels: int, channels: int, num_downsamples: int, num_res_blocks: int, latent_dim: int):
        super().__init__()
        widths = stage_channels(channels, num_downsamples)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        for res in range(num_downsamples):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(widths[res], widths[res]))
            layers.append(Downsample(widths[res]))
            layers.append(nn.Conv2d(widths[res], widths[res + 1], 1))
        for _ in range(max(num_res_blocks, 1)):
            layers.append(ResBlock(widths[-1], widths[-1]))
        layers += [norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(b, latent_dim, h, w) -> (b, 3, h*2^n, w*2^n), unbounded (trained towards [-1, 1])."""

    def __init__(self, out_channels: int, channels: int, num_downsamples: int, num_res_blocks: int, latent_dim: int):
        super().__init__()
        widths = stage_channels(channels, num_downsamples)
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, widths[-1], 3, padding=1)]
        for _ in range(max(num_res_blocks, 1)):
            layers.append(ResBlock(widths[-1], widths[-1]))
        for res in reversed(range(num_downsamples)):
            layers.append(nn.Conv2d(widths[res + 1], widths[res], 1))
            layers.append(Upsample(widths[res]))
            for _ in range(num_res_blocks):
                layers.append(ResBlock(widths[res], widths[res]))
        layers += [norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.net[-1].weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
