"""Reconstruction quality: PSNR and SSIM on images in [0, 1], (b, c, H, W).

Evaluation scores what a user gets back: reconstructions rounded to uint8 pixels, as they are
saved (`as_uint8_images`), like the field's reference scripts; unrounded floats score a little
differently (rounding adds up to half a grey level of error)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 pixels, clamped and rounded to nearest (what a PNG of them holds)."""
    return images.float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def as_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats rounded to the uint8 grid and back to [0, 1] floats: the image a user saves."""
    return to_uint8(images).float().div_(255.0)


def psnr(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB: (b,) tensor."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / (mse + eps))


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; Gaussian window, valid region): (b,) tensor.

    The window shrinks to the image for images smaller than it."""
    x, y = x.float(), y.float()
    channels = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(window, sigma, channels, x.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_x = F.conv2d(x, w, groups=channels)
    mu_y = F.conv2d(y, w, groups=channels)
    sxx = F.conv2d(x * x, w, groups=channels) - mu_x**2
    syy = F.conv2d(y * y, w, groups=channels) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=channels) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim_map.flatten(1).mean(dim=1)
