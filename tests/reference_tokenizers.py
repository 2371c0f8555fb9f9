"""Stand-ins for the published tokenizers, for import tests: the network of LlamaGen's
`VQModel` and of taming-transformers' `VQModel`, with their tensor names and their forward
(attention as an explicit softmax of q k^T, not vqpipe's fused kernel), written here from the
references' structure. Random weights; small widths keep the tests fast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class RefResnet(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class RefAttn(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).permute(0, 2, 1)
        k = self.k(n).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        out = torch.bmm(self.v(n).reshape(b, c, h * w), weights.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class RefResample(nn.Module):
    def __init__(self, c: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2) if down else nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1))) if self.down else self.conv(F.interpolate(x, scale_factor=2.0))


def _level(blocks, attns, names: tuple[str, str]) -> nn.Module:
    level = nn.Module()
    setattr(level, names[0], nn.ModuleList(blocks))
    setattr(level, names[1], nn.ModuleList(attns))
    return level


class ReferenceVQ(nn.Module):
    """fmt "llamagen" or "taming"; attention at the coarsest level and in the middle."""

    def __init__(self, fmt: str, ch: int, ch_mult, codebook_size: int, embed_dim: int, z: int, nrb: int = 2):
        super().__init__()
        self.fmt, self.nrb, self.levels = fmt, nrb, len(ch_mult)
        block_name, attn_name = ("res", "attn") if fmt == "llamagen" else ("block", "attn")
        last = len(ch_mult) - 1
        # encoder
        enc = nn.Module()
        enc.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        downs, width = [], ch
        for i, m in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(nrb):
                blocks.append(RefResnet(width, ch * m))
                width = ch * m
                if i == last:
                    attns.append(RefAttn(width))
            level = _level(blocks, attns, (block_name, attn_name))
            if i != last:
                level.downsample = RefResample(width, down=True)
            downs.append(level)
        setattr(enc, "conv_blocks" if fmt == "llamagen" else "down", nn.ModuleList(downs))
        enc.mid = self._mid(width)
        enc.norm_out, enc.conv_out = _norm(width), nn.Conv2d(width, z, 3, padding=1)
        self.encoder = enc
        # decoder
        dec = nn.Module()
        dec.conv_in = nn.Conv2d(z, width, 3, padding=1)
        dec.mid = self._mid(width)
        ups = []
        for i in reversed(range(len(ch_mult))):
            blocks, attns = [], []
            for _ in range(nrb + 1):
                blocks.append(RefResnet(width, ch * ch_mult[i]))
                width = ch * ch_mult[i]
                if i == last:
                    attns.append(RefAttn(width))
            level = _level(blocks, attns, (block_name, attn_name))
            if i != 0:
                level.upsample = RefResample(width, down=False)
            ups.append(level)
        if fmt == "llamagen":
            dec.conv_blocks = nn.ModuleList(ups)  # coarsest first
        else:
            dec.up = nn.ModuleList(reversed(ups))  # indexed by level, finest first
        dec.norm_out, dec.conv_out = _norm(width), nn.Conv2d(width, 3, 3, padding=1)
        self.decoder = dec
        self.quant_conv, self.post_quant_conv = nn.Conv2d(z, embed_dim, 1), nn.Conv2d(embed_dim, z, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codebook_size, embed_dim)
        if fmt == "llamagen":
            self.quantize.register_buffer("codebook_used", torch.zeros(65536))
        else:
            self.loss = nn.Module()
            self.loss.discriminator = nn.Conv2d(3, 8, 4)  # stands for the training-only tensors

    def _mid(self, width: int) -> nn.Module:
        if self.fmt == "llamagen":
            return nn.ModuleList([RefResnet(width, width), RefAttn(width), RefResnet(width, width)])
        mid = nn.Module()
        mid.block_1, mid.attn_1, mid.block_2 = RefResnet(width, width), RefAttn(width), RefResnet(width, width)
        return mid

    def _run_mid(self, mid, h):
        parts = list(mid) if self.fmt == "llamagen" else [mid.block_1, mid.attn_1, mid.block_2]
        for part in parts:
            h = part(h)
        return h

    def _run_level(self, level, h, resample: str):
        blocks = level.res if self.fmt == "llamagen" else level.block
        for j, block in enumerate(blocks):
            h = block(h)
            if len(level.attn):
                h = level.attn[j](h)
        return getattr(level, resample)(h) if hasattr(level, resample) else h

    def _codebook(self):
        weight = self.quantize.embedding.weight
        return F.normalize(weight, dim=-1) if self.fmt == "llamagen" else weight

    @torch.no_grad()
    def encode(self, x):
        """(b, 3, H, W) in [-1, 1] -> indices (b, h, w)."""
        enc = self.encoder
        h = enc.conv_in(x)
        for level in enc.conv_blocks if self.fmt == "llamagen" else enc.down:
            h = self._run_level(level, h, "downsample")
        h = enc.conv_out(F.silu(enc.norm_out(self._run_mid(enc.mid, h))))
        z = self.quant_conv(h).permute(0, 2, 3, 1)
        if self.fmt == "llamagen":
            z = F.normalize(z, dim=-1)
        codes = self._codebook()
        distances = (z**2).sum(-1, keepdim=True) + (codes**2).sum(-1) - 2 * z @ codes.t()
        return distances.argmin(-1)

    @torch.no_grad()
    def decode(self, indices):
        """indices (b, h, w) -> (b, 3, H, W) in [-1, 1] (unclamped)."""
        dec = self.decoder
        h = dec.conv_in(self.post_quant_conv(self._codebook()[indices].permute(0, 3, 1, 2)))
        h = self._run_mid(dec.mid, h)
        order = dec.conv_blocks if self.fmt == "llamagen" else list(reversed(dec.up))
        for level in order:
            h = self._run_level(level, h, "upsample")
        return dec.conv_out(F.silu(dec.norm_out(h)))
