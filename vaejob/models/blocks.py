"""Building blocks of the ResNet and hierarchical VAEs.

- ``ResBlock``, ``Attention``, ``Downsample``, ``Upsample``: the Stable Diffusion KL autoencoder's (diffusers'
  ``ResnetBlock2D``, mid-block attention, stride-2 conv down, nearest-neighbour up): GroupNorm + SiLU + 3x3 convs
  with a residual connection.
- ``Cell``: VDVAE's bottleneck residual cell (GELU, 1x1 -> 3x3 -> 3x3 -> 1x1, no normalisation: per-image, so
  nothing depends on the batch), its last conv optionally zeroed (a block that starts as the identity) or scaled.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

GROUP_NORM_GROUPS = 8  # SD uses 32 at 128+ channels; at 16-64 channels 8 groups keep >= 2 channels a group


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H x W positions (the SD autoencoder's mid block)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)
        )  # (N, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv: H -> ceil(H / 2)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour up to ``size`` (the encoder's size at that stage, so odd sizes come back exactly), 3x3."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def down_sizes(size: tuple[int, int], stages: int) -> list[tuple[int, int]]:
    """The resolution of each of ``stages`` stages, the first at ``size``, each later one halved (rounded up)."""
    sizes = [size]
    for _ in range(stages - 1):
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    return sizes


class Cell(nn.Module):
    """VDVAE's ``Block``: x (+) c4(gelu(c3(gelu(c2(gelu(c1(gelu(x)))))))), bottleneck ``mid`` channels."""

    def __init__(
        self, in_ch: int, mid: int, out_ch: int, residual: bool = True, last_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.residual = residual
        self.c1 = nn.Conv2d(in_ch, mid, 1)
        self.c2 = nn.Conv2d(mid, mid, 3, padding=1)
        self.c3 = nn.Conv2d(mid, mid, 3, padding=1)
        self.c4 = nn.Conv2d(mid, out_ch, 1)
        self.c4.weight.data.mul_(last_scale)  # 0: starts as the identity (residual) or as zeros
        for conv in (self.c1, self.c2, self.c3, self.c4):
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        return x + h if self.residual else h
