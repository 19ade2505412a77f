"""``model.name=hvae``: a hierarchical VAE of the VDVAE / NVAE family.

Bottom-up: a 3x3 stem at full size, then one stage per entry of ``model.channels`` (full size first, each later
one halved by a stride-2 conv), each with ``model.blocks`` residual cells; every stage's output is kept. Top-down:
from a learned tensor at the lowest resolution, stage by stage back up, ``model.groups[i]`` latent groups at
stage i (``model.latent_channels`` channels at that resolution each), then ``model.blocks`` residual cells and a
nearest-neighbour up-sample. A latent group (VDVAE's ``DecBlock``):

    q(z|x, z_<g) = N(mu_q, sigma_q) from a cell of [h, encoder activation]
    p(z | z_<g)  = N(mu_p, sigma_p) from a cell of h, which also adds a residual to h (zero at init)
    h <- cell(h + proj(z)),   KL analytic per unit given z_<g

Stabilisers (the NaN / exploding-gradient reports of NVAE #2, #17 and VDVAE #25): log sigma of posterior and prior
soft-bounded to [-b, b] with b tanh(x / b) (NVAE's soft clamp, b = ``model.log_scale_bound``, 0 = unbounded as in
VDVAE); the prior's last conv and every residual branch's start at or near zero (VDVAE's init: the model starts as
N(0, I) latents through identity cells); the densities and KLs in fp32. The rest lives in the job: KL warm-up
(``loss.beta_warmup_steps``), gradient clipping and VDVAE's skipping of updates whose gradient norm exceeds
``train.skip_threshold`` with a cap on consecutive skips (``vaejob.optim.StepGuard``), and NVAE's spectral
regularisation (``loss.spectral_reg``, ``vaejob.models.spectral``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaejob.config import ModelConfig
from vaejob.likelihoods import Likelihood
from vaejob.models.base import VAE, VAEOutput, gaussian_kl, gaussian_log_density
from vaejob.models.blocks import Cell, Downsample, Upsample, down_sizes

BOTTLENECK = 0.5  # a cell's middle width over its stream width (VDVAE: 0.25 at widths of 384+)


def soft_bound(x: Tensor, bound: float) -> Tensor:
    return bound * torch.tanh(x / bound) if bound > 0 else x


class LatentGroup(nn.Module):
    def __init__(self, width: int, z_ch: int, scale: float, bound: float) -> None:
        super().__init__()
        mid = max(z_ch, int(width * BOTTLENECK))
        self.z_ch, self.bound = z_ch, bound
        self.posterior = Cell(2 * width, mid, 2 * z_ch, residual=False)
        self.prior = Cell(width, mid, 2 * z_ch + width, residual=False, last_scale=0.0)
        self.z_proj = nn.Conv2d(z_ch, width, 1)
        self.z_proj.weight.data.mul_(scale)
        self.cell = Cell(width, mid, width, last_scale=scale)

    def _prior(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, log_sigma, residual = self.prior(h).split([self.z_ch, self.z_ch, h.shape[1]], dim=1)
        return mu.float(), soft_bound(log_sigma.float(), self.bound), h + residual

    def _out(self, h: Tensor, z: Tensor) -> Tensor:
        return self.cell(h + self.z_proj(z.to(h.dtype)))

    def forward(
        self, h: Tensor, act: Tensor, eps: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(h, KL per unit, posterior mean, log q, log p), each per image (N, units) or (N,)."""
        mu_q, log_sigma_q = self.posterior(torch.cat([h, act], dim=1)).float().chunk(2, dim=1)
        log_sigma_q = soft_bound(log_sigma_q, self.bound)
        mu_p, log_sigma_p, h = self._prior(h)
        eps = torch.randn_like(mu_q) if eps is None else eps.view_as(mu_q).float()
        z = mu_q + torch.exp(log_sigma_q) * eps
        kl = gaussian_kl(mu_q, log_sigma_q, mu_p, log_sigma_p).flatten(1)
        log_q = (-0.5 * eps.pow(2) - log_sigma_q).flatten(1).sum(1) - 0.5 * math.log(2 * math.pi) * kl.shape[
            1
        ]
        log_p = gaussian_log_density(z, mu_p, log_sigma_p).flatten(1).sum(1)
        return self._out(h, z), kl, mu_q.flatten(1), log_q, log_p

    def sample(self, h: Tensor, eps: Tensor, temperature: float) -> Tensor:
        mu_p, log_sigma_p, h = self._prior(h)
        z = mu_p + temperature * torch.exp(log_sigma_p) * eps.view_as(mu_p).float()
        return self._out(h, z)


class HierarchicalVAE(VAE):
    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int], likelihood: Likelihood):
        super().__init__()
        c, h, w = image_shape
        self.likelihood, self.image_shape = likelihood, image_shape
        chs, groups, nb, z_ch = cfg.channels, cfg.groups, cfg.blocks, cfg.latent_channels
        self.sizes = down_sizes((h, w), len(chs))
        # in the order top_down samples them (the lowest resolution first): the noise vector's and the KL's
        stages = list(zip(self.sizes, groups, strict=True))[::-1]
        self.latent_groups = tuple(z_ch * sh * sw for (sh, sw), n in stages for _ in range(n))
        enc_scale = math.sqrt(1 / max(1, nb * len(chs)))
        dec_scale = math.sqrt(1 / max(1, sum(groups) + nb * len(chs)))

        self.stem = nn.Conv2d(c, chs[0], 3, padding=1)
        self.enc = nn.ModuleList(
            nn.Sequential(
                *([Downsample(chs[i - 1], ch)] if i else []),
                *(Cell(ch, int(ch * BOTTLENECK), ch, last_scale=enc_scale) for _ in range(nb)),
            )
            for i, ch in enumerate(chs)
        )
        self.top = nn.Parameter(torch.zeros(1, chs[-1], *self.sizes[-1]))
        self.groups = nn.ModuleList(
            nn.ModuleList(LatentGroup(ch, z_ch, dec_scale, cfg.log_scale_bound) for _ in range(n))
            for ch, n in zip(chs, groups, strict=True)
        )
        self.dec = nn.ModuleList(
            nn.Sequential(*(Cell(ch, int(ch * BOTTLENECK), ch, last_scale=dec_scale) for _ in range(nb)))
            for ch in chs
        )
        self.up = nn.ModuleList(Upsample(chs[i + 1], chs[i]) for i in range(len(chs) - 1))
        self.out = nn.Conv2d(chs[0], likelihood.param_channels(c), 3, padding=1)

    @property
    def latent_dim(self) -> int:
        """Units of all groups: the length of the noise vector a sample is drawn from (``vaejob.fid``)."""
        return self.latent_size

    def bottom_up(self, x: Tensor) -> tuple[Tensor, ...]:
        h = self.stem(x * 2.0 - 1.0)
        acts = []
        for stage in self.enc:
            h = stage(h)
            acts.append(h)
        return tuple(acts)

    def top_down(self, features: tuple[Tensor, ...], eps: Tensor | None = None) -> VAEOutput:
        n = len(features[0])
        noise = iter(eps.split(self.latent_groups, dim=1)) if eps is not None else None
        kls: list[Tensor] = []
        means: list[Tensor] = []
        log_q = log_p = torch.zeros(n, device=self.top.device)
        h = self.top.expand(n, -1, -1, -1)
        for i in range(len(self.enc) - 1, -1, -1):
            for group in self.groups[i]:
                h, kl, mean, lq, lp = group(h, features[i], next(noise) if noise is not None else None)
                kls.append(kl)
                means.append(mean)
                log_q, log_p = log_q + lq, log_p + lp
            h = self._up(i, h)
        return VAEOutput(self.out(F.gelu(h)), torch.cat(kls, 1), torch.cat(means, 1), log_q, log_p)

    def generate(self, eps: Tensor, temperature: float = 1.0) -> Tensor:
        noise = iter(eps.split(self.latent_groups, dim=1))
        h = self.top.expand(len(eps), -1, -1, -1)
        for i in range(len(self.enc) - 1, -1, -1):
            for group in self.groups[i]:
                h = group.sample(h, next(noise), temperature)
            h = self._up(i, h)
        return self.out(F.gelu(h))

    def _up(self, i: int, h: Tensor) -> Tensor:
        """Stage i's residual cells, then up to stage i - 1's size (none after the full-size stage)."""
        h = self.dec[i](h)
        return self.up[i - 1](h, self.sizes[i - 1]) if i else h
