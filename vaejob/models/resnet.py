"""``model.name=resnet``: the Stable Diffusion KL autoencoder's shape at small scale, as a VAE with a N(0, I) prior.

Encoder: 3x3 conv in, then per entry of ``model.channels`` (one stage per resolution, full size first)
``model.blocks`` residual blocks (GroupNorm + SiLU + 3x3) and a stride-2 conv down between stages; at the lowest
resolution a mid block (ResBlock, self-attention when ``model.attention``, ResBlock). Decoder: the mirror, with
``model.blocks + 1`` residual blocks per stage and nearest-neighbour up-sampling. The latent is either spatial
(``model.latent_channels`` > 0: that many channels at the lowest resolution, SD's shape, flattened to one vector)
or dense (``model.latent_dim`` units from a linear head). log sigma^2 is clamped to [-30, 20] as in diffusers.
Works from 28 to 256 px and more, grey or RGB; odd sizes round up going down and come back exactly going up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaejob.config import ModelConfig
from vaejob.likelihoods import Likelihood
from vaejob.models.base import SingleLatentVAE
from vaejob.models.blocks import Attention, Downsample, ResBlock, Upsample, down_sizes, group_norm

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution


def mid_block(ch: int, attention: bool) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch), *([Attention(ch)] if attention else []), ResBlock(ch, ch))


class ResnetVAE(SingleLatentVAE):
    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int], likelihood: Likelihood):
        super().__init__()
        c, h, w = image_shape
        self.likelihood, self.image_shape = likelihood, image_shape
        chs, nb = cfg.channels, cfg.blocks
        self.sizes = down_sizes((h, w), len(chs))
        low_ch, (lh, lw) = chs[-1], self.sizes[-1]
        self.spatial = cfg.latent_channels > 0
        self.latent_dim = cfg.latent_channels * lh * lw if self.spatial else cfg.latent_dim

        self.conv_in = nn.Conv2d(c, chs[0], 3, padding=1)
        down: list[nn.Module] = []
        prev = chs[0]
        for i, ch in enumerate(chs):
            stage: list[nn.Module] = []
            for _ in range(nb):
                stage.append(ResBlock(prev, ch))
                prev = ch
            if i < len(chs) - 1:
                stage.append(Downsample(ch, ch))
            down.append(nn.Sequential(*stage))
        self.down = nn.ModuleList(down)
        self.enc_mid = mid_block(low_ch, cfg.attention)
        self.enc_norm = group_norm(low_ch)
        if self.spatial:
            self.enc_out = nn.Conv2d(low_ch, 2 * cfg.latent_channels, 3, padding=1)
            self.dec_in: nn.Module = nn.Conv2d(cfg.latent_channels, low_ch, 3, padding=1)
        else:
            self.enc_out = nn.Linear(low_ch * lh * lw, 2 * cfg.latent_dim)
            self.dec_in = nn.Sequential(
                nn.Linear(cfg.latent_dim, low_ch * lh * lw), nn.Unflatten(1, (low_ch, lh, lw))
            )
        self.dec_mid = mid_block(low_ch, cfg.attention)
        up: list[nn.ModuleList] = []
        prev = low_ch
        for i in range(len(chs) - 1, -1, -1):
            blocks: list[nn.Module] = []
            for _ in range(nb + 1):
                blocks.append(ResBlock(prev, chs[i]))
                prev = chs[i]
            up.append(
                nn.ModuleList([nn.Sequential(*blocks), Upsample(prev, prev) if i > 0 else nn.Identity()])
            )
        self.up = nn.ModuleList(up)
        self.dec_norm = group_norm(chs[0])
        self.conv_out = nn.Conv2d(chs[0], likelihood.param_channels(c), 3, padding=1)

    def encode_hidden(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        h = F.silu(self.enc_norm(self.enc_mid(h)))
        moments = self.enc_out(h if self.spatial else h.flatten(1))
        mu, logvar = moments.chunk(2, dim=1)  # channels of a spatial latent, units of a dense one
        logvar = torch.clamp(logvar, *LOGVAR_RANGE)
        return mu.flatten(1), logvar.flatten(1), None

    def decode(self, z: Tensor) -> Tensor:
        if self.spatial:
            lh, lw = self.sizes[-1]
            z = z.reshape(len(z), -1, lh, lw)
        h = self.dec_mid(self.dec_in(z))
        for i, (blocks, upsample) in zip(range(len(self.up) - 1, -1, -1), self.up, strict=True):
            h = blocks(h)
            if i > 0:
                h = upsample(h, self.sizes[i - 1])
        return self.conv_out(F.silu(self.dec_norm(h)))
