"""The one interface every VAE family implements, so the trainer, metrics, evaluation, sampling and figures never
ask which family they hold.

A model is an inference path in two halves and a generative path:

- ``bottom_up(x) -> features``: the deterministic part of q(z|x), a tuple of batch-first tensors (a single
  latent's (mu, logvar); a hierarchical model's encoder activations per resolution). Repeating each row K times
  (``repeat_features``) gives K posterior samples per image without running the encoder K times.
- ``top_down(features, eps) -> VAEOutput``: draws z ~ q(z|x) group by group and decodes it. ``eps`` is the
  standard-normal noise of all groups, flattened in group order (N, latent_size); ``None`` draws it from the
  global RNG (training). The output holds the likelihood's parameters, the analytic KL of every latent unit
  (given the groups sampled before it), the posterior means (active units) and log q(z|x), log p(z) at the
  sampled z (importance weights, the IWAE objective).
- ``generate(eps, temperature) -> params``: z from the prior, each group's noise scaled by the temperature.

``latent_groups`` lists the units per group (one group for conv, mlp and resnet). Models with one group are
``SingleLatentVAE``s and also offer ``encode(x) -> (mu, logvar)`` and ``decode(z)``: what latent traversals,
interpolations, the latent scatter and the 2-D manifold need.

Every density and KL here is computed in fp32, whatever autocast does to the convolutions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vaejob.likelihoods import Likelihood

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class VAEOutput(NamedTuple):
    params: Tensor  # (N, P, H, W) parameters of p(x|z)
    kl: Tensor  # (N, D) fp32 KL(q || p) per latent unit, analytic given the earlier groups' samples
    mean: Tensor  # (N, D) posterior means E_q[z | x, z_<g] (active units)
    log_q: Tensor  # (N,) fp32 log q(z|x) at the sampled z
    log_p: Tensor  # (N,) fp32 log p(z) at the sampled z
    hidden: Tensor | None = None  # activations of a ReLU Dense bottleneck (dead units), None without one


def gaussian_kl(mu_q: Tensor, log_sigma_q: Tensor, mu_p: Tensor, log_sigma_p: Tensor) -> Tensor:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) per element (VDVAE's gaussian_analytical_kl)."""
    return (
        log_sigma_p
        - log_sigma_q
        + 0.5 * (torch.exp(2 * log_sigma_q) + (mu_q - mu_p) ** 2) * torch.exp(-2 * log_sigma_p)
        - 0.5
    )


def gaussian_log_density(z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """log N(z; mu, sigma^2) per element."""
    return -0.5 * ((z - mu) * torch.exp(-log_sigma)) ** 2 - log_sigma - HALF_LOG_2PI


def repeat_features(features: tuple[Tensor, ...], times: int) -> tuple[Tensor, ...]:
    """Each image's features ``times`` times in a row (image-major): K posterior samples per image."""
    return features if times == 1 else tuple(f.repeat_interleave(times, 0) for f in features)


class VAE(nn.Module):
    image_shape: tuple[int, int, int]
    likelihood: Likelihood
    latent_groups: tuple[int, ...]  # latent units per group, in the order of the noise vector
    single_latent: bool = False  # True: encode / decode of one latent vector exist (SingleLatentVAE)
    hidden_units: int = 0  # width of a ReLU Dense bottleneck whose dead units are reported (0: none)

    @property
    def latent_size(self) -> int:
        return sum(self.latent_groups)

    def bottom_up(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def top_down(self, features: tuple[Tensor, ...], eps: Tensor | None = None) -> VAEOutput:
        raise NotImplementedError

    def generate(self, eps: Tensor, temperature: float = 1.0) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, eps: Tensor | None = None, samples: int = 1) -> VAEOutput:
        """``samples`` posterior samples per image (IWAE), rows image-major: image i's are rows i*K .. i*K+K-1."""
        return self.top_down(repeat_features(self.bottom_up(x), samples), eps)

    def mean_image(self, params: Tensor) -> Tensor:
        """The decoder's mean image in [0, 1]: what samples and reconstructions show."""
        return self.likelihood.mean(params)


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per dimension, fp32."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class SingleLatentVAE(VAE):
    """One Gaussian latent vector z ~ N(mu(x), exp(logvar(x))) with prior N(0, I); subclasses provide
    ``encode_hidden`` and ``decode``."""

    single_latent = True
    latent_dim: int

    @property
    def latent_groups(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.latent_dim,)

    def encode_hidden(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(mu, logvar, the bottleneck's activations or None)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar, _ = self.encode_hidden(x)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def bottom_up(self, x: Tensor) -> tuple[Tensor, ...]:
        mu, logvar, hidden = self.encode_hidden(x)
        return (mu, logvar) if hidden is None else (mu, logvar, hidden)

    def top_down(self, features: tuple[Tensor, ...], eps: Tensor | None = None) -> VAEOutput:
        mu, logvar = features[0], features[1]
        if eps is None:  # training: z in the autocast dtype, as the seed notebooks' reparameterisation
            eps = torch.randn_like(mu)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:  # given noise (evaluation): z in fp32
            z = mu.float() + torch.exp(0.5 * logvar.float()) * eps
        params = self.decode(z)
        zf, ef, lv = z.float(), eps.float(), logvar.float()
        log_q = (-0.5 * ef.pow(2) - 0.5 * lv).sum(1) - HALF_LOG_2PI * zf.shape[1]
        log_p = (-0.5 * zf.pow(2)).sum(1) - HALF_LOG_2PI * zf.shape[1]
        hidden = features[2] if len(features) > 2 else None
        return VAEOutput(params, kl_per_dim(mu, logvar), mu, log_q, log_p, hidden)

    def generate(self, eps: Tensor, temperature: float = 1.0) -> Tensor:
        return self.decode(eps * temperature)
