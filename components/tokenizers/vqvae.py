"""VQ-VAE: convolutional encoder -> quantizer -> convolutional decoder.

Every tokenizer architecture offers the same interface to training and to `Tokenizer`:
`tiers` (names of its token tiers, coarsest first; SINGLE_TIER for one), `quantizers`
(tier -> quantizer), `tier_downsample` (tier -> spatial factor), `encode_indices`,
`decode_indices`, `last_layer` (the decoder's last weight, for VQ-GAN's adaptive weight) and
`forward(x) -> TokenizerOutput`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from components.quantizers import QuantizerConfig
from components.tokenizers.blocks import ConvShape, Decoder, Encoder
from components.tokenizers.taming import TamingDecoder, TamingEncoder, TamingShape

# The name of a one-tier tokenizer's only tier (a hierarchical one has "top" and "bottom").
SINGLE_TIER = "single"


class TokenizerOutput(NamedTuple):
    """reconstruction: (b, 3, H, W) in model space [-1, 1]; indices: tier -> (b, h, w[, m]);
    quant_loss: the quantizers' codebook/commitment terms (the reconstruction loss is the
    training step's, see `training.py`); parts: detached scalars for logging."""

    reconstruction: torch.Tensor
    indices: dict[str, torch.Tensor]
    quant_loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def quantize_fp32(quantizer: nn.Module, z: torch.Tensor):
    """Under an autocast context the convolutions run in reduced precision; the quantizer
    (distances, EMA statistics) always runs in fp32."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        return quantizer(z.float())


class VQVAE(nn.Module):
    tiers: tuple[str, ...] = (SINGLE_TIER,)

    def __init__(self, quantizer: QuantizerConfig, shape: ConvShape | TamingShape, in_channels: int = 3):
        """`shape` picks the network: a ConvShape the compact one (blocks.py), a TamingShape
        taming-transformers' and LlamaGen's (taming.py)."""
        super().__init__()
        # Built encoder, quantizer, decoder: the order they draw their initial weights in.
        taming = isinstance(shape, TamingShape)
        self.encoder = TamingEncoder(shape, in_channels) if taming else Encoder(in_channels, *shape)
        self.quantizer = quantizer.build(shape.latent_dim)
        self.decoder = TamingDecoder(shape, in_channels) if taming else Decoder(in_channels, *shape)
        self.downsample = 2 ** (len(shape.ch_mult) - 1) if taming else 2**shape.num_downsamples

    @property
    def quantizers(self) -> dict[str, nn.Module]:
        return {SINGLE_TIER: self.quantizer}

    @property
    def tier_downsample(self) -> dict[str, int]:
        return {SINGLE_TIER: self.downsample}

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> channels-last latent (b, h, w, d), the quantizer's input."""
        return self.encoder(x).permute(0, 2, 3, 1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, h, w, d) code vectors -> (b, 3, H, W)."""
        return self.decoder(codes.permute(0, 3, 1, 2).contiguous())

    def encode_indices(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {SINGLE_TIER: self.quantizer(self.encode_latent(x)).indices}

    def decode_indices(self, indices: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decode_codes(self.quantizer.indices_to_codes(indices[SINGLE_TIER]))

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        q = quantize_fp32(self.quantizer, self.encode_latent(x))
        reconstruction = self.decode_codes(q.quantized)
        parts = {"quant_loss": q.loss.detach(), **q.stats}
        return TokenizerOutput(reconstruction, {SINGLE_TIER: q.indices}, q.loss, parts)
