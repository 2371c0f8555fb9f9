"""Metrics: reconstruction (PSNR, SSIM), codebook usage/perplexity, prior bits/token, image grids."""

from components.metrics.codebook import CodeCounts, code_counts, codebook_stats, used_code_counts
from components.metrics.grid import make_grid, save_grid
from components.metrics.prior import PriorBits, bits_per_token
from components.metrics.reconstruction import psnr, ssim

__all__ = [
    "CodeCounts",
    "PriorBits",
    "bits_per_token",
    "code_counts",
    "codebook_stats",
    "make_grid",
    "psnr",
    "save_grid",
    "ssim",
    "used_code_counts",
]
