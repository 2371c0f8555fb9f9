"""LPIPS perceptual distance (Zhang et al., 2018), VGG16 variant, from a local weights file.

Nothing is downloaded: the weights come from the file a user names
(`train_tokenizer.perceptual_weights`). It must hold the VGG16 convolutions and LPIPS's five
linear heads, under either naming:

- torchvision + lpips: `features.{i}.weight|bias` (torchvision's vgg16, i in 0..28) and
  `lin{k}.model.1.weight` (lpips' `weights/v0.1/vgg.pth`), merged into one file;
- the `lpips` package's whole model: `net.slice{n}.{i}.weight|bias` and `lin{k}.model.1.weight`.

Made once, on a machine with the `lpips` package:

    import lpips; from safetensors.torch import save_file
    m = lpips.LPIPS(net="vgg")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "lpips_vgg.safetensors")

`.safetensors` files are read as such; anything else with `torch.load(weights_only=True)`,
which refuses pickled code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.io import load_state_file

# torchvision's vgg16.features up to relu5_3: channels per conv, "M" for max-pooling.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# The index (in `features`) of the ReLU after which LPIPS taps a feature map.
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class _Lin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """d(x, y) per image, for images in [-1, 1]; frozen, always in eval mode."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU(inplace=False)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        for k, channels in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{k}", _Lin(channels))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
                if i == _TAPS[-1]:
                    break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) pairs -> (b,) distances."""
        total = 0.0
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y), strict=True)):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}")((nx - ny) ** 2).mean(dim=(1, 2, 3))
        return total

    @classmethod
    def load(cls, path: str | Path) -> LPIPS:
        path = Path(path)
        raw = load_state_file(path, "LPIPS (train_tokenizer.perceptual_weights)")
        model = cls()
        expected = set(model.state_dict())
        state = {}
        for key, value in raw.items():
            match = re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key)
            name = f"features.{match[1]}.{match[2]}" if match else key
            if name in expected:
                state[name] = value
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(
                f"{path} is not an LPIPS VGG16 weights file: missing {', '.join(missing[:6])}"
                + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
                + " (see components/tokenizers/lpips.py for how to make one)"
            )
        for name, value in state.items():
            want = model.state_dict()[name].shape
            if tuple(value.shape) != tuple(want):
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, LPIPS VGG16 needs {tuple(want)}")
        model.load_state_dict(state)
        return model


def reconstruction_loss(kind: str, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 or L2 (squared error) over pixels, in fp32."""
    if kind == "l1":
        return F.l1_loss(reconstruction.float(), target.float())
    if kind == "l2":
        return F.mse_loss(reconstruction.float(), target.float())
    raise ValueError(f"unknown reconstruction loss {kind!r} (allowed: l1, l2)")
