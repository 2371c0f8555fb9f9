"""The encoder/decoder of taming-transformers' VQGAN and LlamaGen's VQ tokenizers (`network:
taming`): levels of pre-activation ResNet blocks (GroupNorm + SiLU) with per-level width
multipliers, self-attention at chosen resolutions and in the middle, a 1x1 `quant_conv` from
`z_channels` to the quantizer's width and a `post_quant_conv` back.

    Encoder: conv_in -> per level: num_res_blocks x [ResnetBlock (+ attention)], downsample
             (all but the last level) -> mid: ResnetBlock, attention, ResnetBlock -> norm, SiLU,
             conv_out (z_channels) -> quant_conv (latent_dim)
    Decoder: post_quant_conv -> conv_in -> mid -> per level, coarsest first:
             (num_res_blocks + 1) x [ResnetBlock (+ attention)], upsample (all but the finest)
             -> norm, SiLU, conv_out

`len(ch_mult) - 1` levels downsample by 2 each (f4: 3 levels, f8: 4, f16: 5). LlamaGen's VQ-16
is `channels: 128, ch_mult: [1, 1, 2, 2, 4], num_res_blocks: 2, attn_resolutions: [16]` at 256
px, `mid_attention: true, z_channels: 256, norm_groups: 32`, latent_dim 8 (its codebook width).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from components.tokenizers.blocks import Upsample  # nearest neighbour, then a 3x3 conv: the references' own


class TamingShape(NamedTuple):
    """Everything that sizes the network. `attn_resolutions`: feature-map sides (pixels of
    `image_size` divided by 2^level) whose ResNet blocks are each followed by self-attention."""

    image_size: int
    channels: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    mid_attention: bool
    z_channels: int
    latent_dim: int
    norm_groups: int

    @property
    def widths(self) -> list[int]:
        return [self.channels * m for m in self.ch_mult]

    def resolution(self, level: int) -> int:
        return self.image_size // 2**level

    def attends(self, level: int) -> bool:
        return self.resolution(level) in self.attn_resolutions


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(b, c_in, h, w) -> (b, c_out, h, w): norm, SiLU, 3x3 conv, twice, plus a 1x1 shortcut
    when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """(b, c, h, w) -> same: one-head self-attention over the h*w positions, residual. 1x1
    convolutions for q, k, v and the output, as the references have them (so their weights map
    one to one); the product runs through scaled_dot_product_attention (flash kernels on GPUs)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b, 1, h*w, c)
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(heads(self.q(n)), heads(self.k(n)), heads(self.v(n)))
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """(b, c, h, w) -> (b, c, h/2, w/2): pad right and bottom by one, 3x3 conv of stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution: ResNet blocks, each followed by attention where the level attends, and
    the resampling to the next level (None at the end of the path)."""

    def __init__(self, widths: list[tuple[int, int]], attend: bool, groups: int, resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in widths)
        self.attentions = nn.ModuleList(AttentionBlock(o, groups) for _, o in widths) if attend else nn.ModuleList()
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.attentions):
                x = self.attentions[i](x)
        return x if self.resample is None else self.resample(x)


class Middle(nn.Module):
    """ResnetBlock, attention (when `mid_attention`), ResnetBlock at the coarsest resolution."""

    def __init__(self, channels: int, attend: bool, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attention = AttentionBlock(channels, groups) if attend else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attention(self.block_1(x)))


class TamingEncoder(nn.Module):
    """(b, 3, H, W) in [-1, 1] -> (b, latent_dim, H / 2^(L-1), W / 2^(L-1)), L = len(ch_mult)."""

    def __init__(self, shape: TamingShape, in_channels: int = 3):
        super().__init__()
        widths, groups, last = shape.widths, shape.norm_groups, len(shape.ch_mult) - 1
        self.conv_in = nn.Conv2d(in_channels, shape.channels, 3, padding=1)
        levels, width = [], shape.channels
        for level, out in enumerate(widths):
            pairs = [(width if i == 0 else out, out) for i in range(shape.num_res_blocks)]
            width = out if shape.num_res_blocks else width
            resample = Downsample(width) if level < last else None
            levels.append(Level(pairs, shape.attends(level), groups, resample))
        self.levels = nn.ModuleList(levels)
        self.mid = Middle(width, shape.mid_attention, groups)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, shape.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(shape.z_channels, shape.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class TamingDecoder(nn.Module):
    """(b, latent_dim, h, w) -> (b, 3, h * 2^(L-1), w * 2^(L-1)), unbounded (trained towards [-1, 1]).
    `levels[i]` works at resolution level i (0: full size), as taming-transformers indexes them;
    they run coarsest first."""

    def __init__(self, shape: TamingShape, out_channels: int = 3):
        super().__init__()
        widths, groups = shape.widths, shape.norm_groups
        width = widths[-1]
        self.post_quant_conv = nn.Conv2d(shape.latent_dim, shape.z_channels, 1)
        self.conv_in = nn.Conv2d(shape.z_channels, width, 3, padding=1)
        self.mid = Middle(width, shape.mid_attention, groups)
        levels: list[Level] = []
        for level in reversed(range(len(widths))):
            out = widths[level]
            pairs = [(width if i == 0 else out, out) for i in range(shape.num_res_blocks + 1)]
            width = out
            levels.insert(0, Level(pairs, shape.attends(level), groups, Upsample(width) if level > 0 else None))
        self.levels = nn.ModuleList(levels)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.levels):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
