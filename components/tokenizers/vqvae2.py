"""VQ-VAE-2 (Razavi et al., 2019): a two-tier hierarchy of latents.

    x --encoder--> h_b (H/f) --top_encoder--> h_t (H/(f*t)) --top quantizer--> q_t
    q_t --top_decoder--> d_t (H/f);  [h_b, d_t] --1x1--> z_b --bottom quantizer--> q_b
    [top_upsample(q_t), q_b] --decoder--> x'

The bottom tier is quantized knowing what the top tier already says (d_t), so its codes
carry the detail the top misses. Each tier has its own quantizer (any registered type). Token
tiers are "top" and "bottom", coarsest first: the order a prior models them in.
"""

from __future__ import annotations

import torch
from torch import nn

from components.quantizers import QuantizerConfig
from components.tokenizers.blocks import (
    ConvShape,
    Decoder,
    Downsample,
    Encoder,
    ResBlock,
    Upsample,
    norm,
    stage_channels,
)
from components.tokenizers.vqvae import TokenizerOutput, quantize_fp32


class _Down(nn.Module):
    """(b, c_in, h, w) -> (b, c_out, h/2^n, w/2^n)."""

    def __init__(self, in_channels: int, out_channels: int, n: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n):
            layers += [ResBlock(in_channels, in_channels), Downsample(in_channels)]
        layers += [
            ResBlock(in_channels, in_channels),
            norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Up(nn.Module):
    """(b, c_in, h, w) -> (b, c_out, h*2^n, w*2^n)."""

    def __init__(self, in_channels: int, out_channels: int, width: int, n: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), ResBlock(width, width)]
        layers += [Upsample(width) for _ in range(n)]
        layers += [norm(width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _cf(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


class VQVAE2(nn.Module):
    tiers: tuple[str, ...] = ("top", "bottom")

    def __init__(
        self,
        quantizer: QuantizerConfig,
        top_quantizer: QuantizerConfig,
        shape: ConvShape,
        top_downsamples: int,
        in_channels: int = 3,
    ):
        """`quantizer` quantizes the bottom tier, `top_quantizer` the top one, whose grid is the
        bottom's divided by 2^top_downsamples."""
        super().__init__()
        channels, num_downsamples, num_res_blocks, latent_dim = shape
        hidden = stage_channels(channels, num_downsamples)[-1]
        self.encoder = Encoder(in_channels, channels, num_downsamples, num_res_blocks, hidden)
        self.top_encoder = _Down(hidden, latent_dim, top_downsamples)
        self.top_quantizer = top_quantizer.build(latent_dim)
        self.top_decoder = _Up(latent_dim, latent_dim, hidden, top_downsamples)
        self.bottom_in = nn.Conv2d(hidden + latent_dim, latent_dim, 1)
        self.quantizer = quantizer.build(latent_dim)
        self.top_upsample = _Up(latent_dim, latent_dim, hidden, top_downsamples)
        self.decoder = Decoder(in_channels, channels, num_downsamples, num_res_blocks, 2 * latent_dim)
        self.downsample = 2**num_downsamples
        self.top_factor = 2**top_downsamples

    @property
    def quantizers(self) -> dict[str, nn.Module]:
        return {"top": self.top_quantizer, "bottom": self.quantizer}

    @property
    def tier_downsample(self) -> dict[str, int]:
        return {"top": self.downsample * self.top_factor, "bottom": self.downsample}

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.net[-1].weight

    def _decode(self, top_codes: torch.Tensor, bottom_codes: torch.Tensor) -> torch.Tensor:
        """Channels-last code vectors of both tiers -> (b, 3, H, W)."""
        return self.decoder(torch.cat([self.top_upsample(_cf(top_codes)), _cf(bottom_codes)], dim=1))

    def _quantize(self, x: torch.Tensor, fp32: bool):
        h_b = self.encoder(x)
        run = quantize_fp32 if fp32 else (lambda quantizer, z: quantizer(z))
        q_t = run(self.top_quantizer, _cl(self.top_encoder(h_b)))
        d_t = self.top_decoder(_cf(q_t.quantized).to(h_b.dtype))
        q_b = run(self.quantizer, _cl(self.bottom_in(torch.cat([h_b, d_t.to(h_b.dtype)], dim=1))))
        return q_t, q_b

    def encode_indices(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q_t, q_b = self._quantize(x, fp32=False)
        return {"top": q_t.indices, "bottom": q_b.indices}

    def decode_indices(self, indices: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._decode(
            self.top_quantizer.indices_to_codes(indices["top"]), self.quantizer.indices_to_codes(indices["bottom"])
        )

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        q_t, q_b = self._quantize(x, fp32=True)
        reconstruction = self._decode(q_t.quantized, q_b.quantized)
        loss = q_t.loss + q_b.loss
        parts = {"quant_loss": loss.detach()}
        for tier, q in (("top", q_t), ("bottom", q_b)):
            parts.update({f"{k}_{tier}": v for k, v in q.stats.items()})
        # Tier means under the plain names, so every architecture logs `codebook_usage`.
        for k in q_b.stats:
            if k in q_t.stats:
                parts[k] = (q_t.stats[k] + q_b.stats[k]) / 2
        return TokenizerOutput(reconstruction, {"top": q_t.indices, "bottom": q_b.indices}, loss, parts)
