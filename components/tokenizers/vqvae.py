"""VQ-VAE: convolutional encoder -> quantizer -> convolutional decoder."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from components.quantizers import QuantizerConfig
from components.tokenizers.blocks import Decoder, Encoder


class VQVAEOutput(NamedTuple):
    """reconstruction: (b, 3, H, W) in model space [-1, 1]; indices: (b, h, w);
    loss: total (reconstruction + quantizer); parts: detached scalars for logging."""

    reconstruction: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


class VQVAE(nn.Module):
    def __init__(
        self,
        quantizer: QuantizerConfig,
        channels: int = 64,
        num_downsamples: int = 2,
        num_res_blocks: int = 1,
        latent_dim: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        self.encoder = Encoder(in_channels, channels, num_downsamples, num_res_blocks, latent_dim)
        self.quantizer = quantizer.build(latent_dim)
        self.decoder = Decoder(in_channels, channels, num_downsamples, num_res_blocks, latent_dim)
        self.downsample = 2**num_downsamples

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> channels-last latent (b, h, w, d), the quantizer's input."""
        return self.encoder(x).permute(0, 2, 3, 1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, h, w, d) code vectors -> (b, 3, H, W)."""
        return self.decoder(codes.permute(0, 3, 1, 2).contiguous())

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Under an autocast context the convolutions run in reduced precision; the quantizer
        (distances, EMA statistics) always runs in fp32."""
        z = self.encode_latent(x)
        with torch.autocast(device_type=z.device.type, enabled=False):
            q = self.quantizer(z.float())
        reconstruction = self.decode_codes(q.quantized)
        recon_loss = F.mse_loss(reconstruction.float(), x.float())
        loss = recon_loss + q.loss
        parts = {"recon_loss": recon_loss.detach(), "quant_loss": q.loss.detach(), **q.stats}
        return VQVAEOutput(reconstruction, q.indices, loss, parts)
