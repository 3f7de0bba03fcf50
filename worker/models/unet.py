"""A small conv U-Net predicting flow-matching velocity v(x_t, t), for 8x8 to 64x64 images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to the usual 0..1000 range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, dim * 4), nn.SiLU(), nn.Linear(dim * 4, dim * 4))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(timestep_embedding(t, self.dim))


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels_in), channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.time = nn.Linear(time_dim, channels_out * 2)
        self.norm2 = nn.GroupNorm(_groups(channels_out), channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = (nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out
                     else nn.Identity())

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(time)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class UNet(nn.Module):
    def __init__(self, image_channels: int = 1, channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2, 2), patch: int = 1) -> None:
        super().__init__()
        # patch > 1 folds patch x patch pixels into channels first (space-to-depth): the
        # same network at 1/patch^2 of the cost, which is what makes CPU training practical.
        self.patch = patch
        self.time = TimeMLP(channels)
        time_dim = channels * 4
        self.stem = nn.Conv2d(image_channels * patch * patch, channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        width_in = channels
        for level, width in enumerate(widths):
            self.down.append(ResBlock(width_in, width, time_dim))
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last
                                   else nn.Conv2d(width, width, 3, stride=2, padding=1))
            width_in = width
        self.mid = ResBlock(width_in, width_in, time_dim)
        self.up = nn.ModuleList()
        for width in reversed(widths):
            self.up.append(ResBlock(width_in + width, width, time_dim))
            width_in = width
        self.out_norm = nn.GroupNorm(_groups(width_in), width_in)
        self.out = nn.Conv2d(width_in, image_channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = self.time(t)
        size = x.shape[-2:]
        if self.patch > 1:
            x = _pad_to_multiple(x, self.patch)
            x = F.pixel_unshuffle(x, self.patch)
        h = self.stem(x)
        skips = []
        for block, downsample in zip(self.down, self.downsample, strict=True):
            h = block(h, time)
            skips.append(h)
            h = downsample(h)
        h = self.mid(h, time)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), time)
        out = self.out(F.silu(self.out_norm(h)))
        if self.patch > 1:
            out = F.pixel_shuffle(out, self.patch)[..., : size[0], : size[1]]
        return out


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
