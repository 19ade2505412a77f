"""Decoder likelihoods p(x|z): what the decoder's output parameterises, its nats per image, its mean image.

Images are 8-bit: x takes one of 256 levels k/255 per channel. A likelihood is *discrete* when it puts
probability mass on those levels (each pixel's 256 masses sum to 1), so its −ELBO, IW-NLL and bits/dim are
the quantities published tables report (CIFAR-10: NVAE 2.91, VDVAE 2.87 bits/dim):

- ``discretized_logistic_mixture``: PixelCNN++'s mixture of K discretized logistics (NVAE's decoder), with its
  linear channel coupling for RGB; ``discretized_gaussian``: a Gaussian integrated over each level's bin, its
  scale learned per channel (a parameter) or per pixel (from the decoder). Both have the edge bins open
  (all mass below 0 / above 255 goes to 0 / 255) and a bounded log scale (>= -7), the stabiliser NVAE and
  PixelCNN++ use.
- ``gaussian`` (fixed σ) trains on the continuous density (an MSE-like loss), but what it reports (``eval_nll``)
  is the same Gaussian discretized over the 256 levels: a continuous density's "nats" can be negative
  (−1.38 a pixel for a perfect reconstruction at σ = 0.1), the discretized one cannot.
- ``bernoulli`` (binary cross-entropy against intensities in [0, 1], the seed notebooks' loss) is not a
  distribution over 8-bit images unless they are binary: its nats compare with those notebooks, and no
  bits/dim is reported for it.

All math runs in fp32 even under autocast: sums over thousands of pixels lose too much in bf16/fp16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaejob.config import LossConfig

MIN_LOG_SCALE = -7.0  # PixelCNN++ / NVAE: keeps a collapsing scale from producing infinite likelihoods
HALF_BIN = 1.0 / 255  # half a level's width on the [-1, 1] scale
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _to_pm1(x: Tensor) -> Tensor:
    return x.float() * 2.0 - 1.0


def _per_image(per_pixel: Tensor) -> Tensor:
    return per_pixel.flatten(1).sum(1)


class Likelihood(nn.Module):
    """``param_channels(C)`` decoder channels per pixel parameterise p(x|z) of a C-channel image."""

    discrete: bool = False  # the reported nats are a distribution over the 256 levels of each pixel

    def param_channels(self, channels: int) -> int:
        raise NotImplementedError

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        """(N,) nats per image: the training objective."""
        raise NotImplementedError

    def eval_nll(self, params: Tensor, x: Tensor) -> Tensor:
        """(N,) nats per image as evaluation reports them (discrete where the likelihood allows)."""
        return self.nll(params, x)

    def mean(self, params: Tensor) -> Tensor:
        """The decoder's mean image in [0, 1]: what samples and reconstructions show."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    def param_channels(self, channels: int) -> int:
        return channels

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        return _per_image(F.binary_cross_entropy_with_logits(params.float(), x.float(), reduction="none"))

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params.float())


def _discretized_normal_log_mass(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(level of x) under N(mean, exp(log_scale)) integrated over the level's bin, on the [-1, 1]
    scale; the edge bins take the tails. Differences of log-CDFs in log space: no underflow far out."""
    inv = torch.exp(-log_scale)
    upper = torch.where(x > 0.999, torch.full_like(x, math.inf), (x - mean + HALF_BIN) * inv)
    lower = torch.where(x < -0.999, torch.full_like(x, -math.inf), (x - mean - HALF_BIN) * inv)
    # log(Φ(u) - Φ(l)) = log Φ(u) + log(1 - exp(log Φ(l) - log Φ(u))); mirror to the upper tail where that is
    # more accurate (both bounds above the mean).
    flip = lower > 0
    u, low = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_u, log_l = torch.special.log_ndtr(u), torch.special.log_ndtr(low)
    mass = log_u + torch.log(-torch.expm1(torch.clamp(log_l - log_u, max=-1e-30)))
    # A bin far narrower than the scale: its two log-CDFs agree in float32, so use the density at the level
    # times the bin's width (exact to O(width²), as PixelCNN++ does for its logistic).
    width = 2 * HALF_BIN * inv
    narrow = (width < 1e-3) & (x > -0.999) & (x < 0.999)
    mid = (x - mean) * inv
    density = -0.5 * mid.pow(2) - HALF_LOG_2PI + torch.log(width)
    return torch.where(narrow, density, mass)


class Gaussian(Likelihood):
    """Fixed σ on pixels in [0, 1]: continuous objective, discretized report."""

    discrete = True

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def param_channels(self, channels: int) -> int:
        return channels

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        sigma = self.std
        z = (x.float() - torch.sigmoid(params.float())) / sigma
        return _per_image(0.5 * z**2 + math.log(sigma) + 0.5 * math.log(2 * math.pi))

    def eval_nll(self, params: Tensor, x: Tensor) -> Tensor:
        mean = _to_pm1(torch.sigmoid(params.float()))
        log_scale = torch.full_like(mean, math.log(2 * self.std))  # σ on [0, 1] is 2σ on [-1, 1]
        return -_per_image(_discretized_normal_log_mass(_to_pm1(x), mean, log_scale))

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params.float())


class DiscretizedGaussian(Likelihood):
    """Mean per pixel from the decoder (through tanh, on [-1, 1]); log scale per channel (a learned parameter)
    or per pixel (decoder channels), bounded below by ``MIN_LOG_SCALE``."""

    discrete = True

    def __init__(self, channels: int, scale: str) -> None:
        super().__init__()
        self.per_pixel = scale == "pixel"
        self.log_scale = None if self.per_pixel else nn.Parameter(torch.full((channels,), math.log(0.2)))

    def param_channels(self, channels: int) -> int:
        return 2 * channels if self.per_pixel else channels

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        p = params.float()
        if self.per_pixel:
            mean, log_scale = p.chunk(2, dim=1)
        else:
            assert self.log_scale is not None
            mean, log_scale = p, self.log_scale.float().view(1, -1, 1, 1).expand_as(p)
        return torch.tanh(mean), torch.clamp(log_scale, min=MIN_LOG_SCALE)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        mean, log_scale = self._split(params)
        return -_per_image(_discretized_normal_log_mass(_to_pm1(x), mean, log_scale))

    def mean(self, params: Tensor) -> Tensor:
        return (self._split(params)[0] + 1.0) / 2.0


class DiscretizedLogisticMixture(Likelihood):
    """PixelCNN++ (Salimans et al. 2017): per pixel K mixture weights shared by the channels, per channel and
    component a mean and log scale, and for RGB the coefficients that make green depend on red and blue on
    both (so 10K decoder channels for RGB, 3K for grayscale)."""

    discrete = True

    def __init__(self, channels: int, mixtures: int) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"the logistic mixture models 1 or 3 channels, got {channels}")
        self.k, self.channels = mixtures, channels

    def param_channels(self, channels: int) -> int:
        return self.k * (1 + 2 * channels + (3 if channels == 3 else 0))

    def _split(self, params: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        n, _, h, w = params.shape
        p = params.float()
        k, c = self.k, channels
        logits = p[:, :k]
        rest = p[:, k:].reshape(n, -1, c, k, h, w)  # (N, groups, C, K, H, W)
        means, log_scales = rest[:, 0], torch.clamp(rest[:, 1], min=MIN_LOG_SCALE)
        coeffs = torch.tanh(rest[:, 2]) if c == 3 else None  # three coefficients, stored in the C axis
        return logits, means, log_scales, coeffs

    def _coupled_means(self, means: Tensor, coeffs: Tensor | None, x: Tensor) -> Tensor:
        """Channel c's mean shifted by the coefficient-weighted values of the channels before it."""
        if coeffs is None:
            return means
        xr, xg = x[:, 0:1], x[:, 1:2]  # (N, 1, H, W) -> broadcast over K
        m_g = means[:, 1] + coeffs[:, 0] * xr
        m_b = means[:, 2] + coeffs[:, 1] * xr + coeffs[:, 2] * xg
        return torch.stack([means[:, 0], m_g, m_b], dim=1)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        c = x.shape[1]
        logits, means, log_scales, coeffs = self._split(params, c)
        xs = _to_pm1(x)
        means = self._coupled_means(means, coeffs, xs)
        xk = xs.unsqueeze(2)  # (N, C, 1, H, W) against (N, C, K, H, W)
        centered, inv = xk - means, torch.exp(-log_scales)
        plus, minus = inv * (centered + HALF_BIN), inv * (centered - HALF_BIN)
        log_cdf_plus = plus - F.softplus(plus)  # log σ(plus): the lowest level takes the lower tail
        log_one_minus_cdf_min = -F.softplus(minus)  # log(1 - σ(minus)): the highest level, the upper tail
        cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        mid = inv * centered
        log_pdf_mid = (
            mid - log_scales - 2.0 * F.softplus(mid)
        )  # density at the centre, when the mass underflows
        log_mass = torch.where(
            xk < -0.999,
            log_cdf_plus,
            torch.where(
                xk > 0.999,
                log_one_minus_cdf_min,
                torch.where(
                    cdf_delta > 1e-5,
                    torch.log(torch.clamp(cdf_delta, min=1e-12)),
                    log_pdf_mid - math.log(127.5),
                ),
            ),
        )
        log_px = log_mass.sum(1) + F.log_softmax(logits, dim=1)  # channels of one component, then mix
        return -_per_image(torch.logsumexp(log_px, dim=1))

    def mean(self, params: Tensor) -> Tensor:
        """Mixture-weighted mean per channel, red first, each coupling on the means before it."""
        c = self.channels
        logits, means, _, coeffs = self._split(params, c)
        weights = torch.softmax(logits, dim=1)  # (N, K, H, W)
        out = []
        for ch in range(c):
            m = means[:, ch]
            if coeffs is not None and ch == 1:
                m = m + coeffs[:, 0] * out[0].unsqueeze(1)
            elif coeffs is not None and ch == 2:
                m = m + coeffs[:, 1] * out[0].unsqueeze(1) + coeffs[:, 2] * out[1].unsqueeze(1)
            out.append(torch.clamp((weights * m).sum(1), -1.0, 1.0))
        return (torch.stack(out, dim=1) + 1.0) / 2.0


def build_likelihood(cfg: LossConfig, channels: int) -> Likelihood:
    if cfg.likelihood == "bernoulli":
        return Bernoulli()
    if cfg.likelihood == "gaussian":
        return Gaussian(cfg.gaussian_std)
    if cfg.likelihood == "discretized_gaussian":
        return DiscretizedGaussian(channels, cfg.scale)
    return DiscretizedLogisticMixture(channels, cfg.mixtures)
