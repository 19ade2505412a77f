"""The seed notebooks' models: a convolutional VAE (the Keras/PyTorch notebooks' shape) and the classic MLP VAE.

Both map images in [0,1] (N,C,H,W) to (mu, logvar) and latents back to the parameters of the decoder's
likelihood (``vaejob.likelihoods``: a submodule, so a learned scale trains, checkpoints and syncs with the rest):
as many channels per pixel as it needs. Their parameter names are those of every checkpoint written so far.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from vaejob.config import ModelConfig
from vaejob.likelihoods import Likelihood
from vaejob.models.base import SingleLatentVAE

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU, "gelu": nn.GELU, "elu": nn.ELU}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def _down_size(size: int, kernel: int) -> int:
    """Output size of a stride-2 conv with 'same'-style padding k//2 (Keras padding='same')."""
    return (size + 2 * (kernel // 2) - kernel) // 2 + 1


class DenseHeadVAE(SingleLatentVAE):
    """Encoder -> features -> (optional Dense bottleneck) -> (mu, logvar); decoder z -> likelihood parameters."""

    encoder: nn.Module  # x -> features (N, F)
    hidden: nn.Module  # features -> bottleneck activations (Identity when there is no bottleneck)
    to_mu: nn.Linear
    to_logvar: nn.Linear
    decoder: nn.Module  # z -> likelihood parameters (N, P, H, W)

    def encode_hidden(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        h = self.hidden(self.encoder(x))
        return self.to_mu(h), self.to_logvar(h), h if self.hidden_units else None

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    @property
    def has_bottleneck(self) -> bool:
        return not isinstance(self.hidden, nn.Identity)

    @property
    def hidden_units(self) -> int:  # type: ignore[override]
        """Width of a ReLU Dense bottleneck (else 0): the units whose death strands a model. Only a ReLU unit
        can die (output 0 and no gradient on every image); a leaky_relu, silu, gelu or elu unit whose output
        is <= 0 everywhere still gets a gradient, so none is reported for those."""
        relu = self.has_bottleneck and isinstance(self.hidden[-1], nn.ReLU)
        return self.to_mu.in_features if relu else 0


class ConvVAE(DenseHeadVAE):
    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int], likelihood: Likelihood):
        super().__init__()
        c, h, w = image_shape
        self.likelihood = likelihood
        self.latent_dim, self.image_shape = cfg.latent_dim, image_shape
        act, k = ACTIVATIONS[cfg.activation], cfg.kernel_size
        sizes = [(h, w)]
        layers: list[nn.Module] = []
        prev = c
        for ch in cfg.channels:
            layers += [nn.Conv2d(prev, ch, k, stride=2, padding=k // 2), _norm(cfg.norm, ch), act()]
            prev = ch
            sizes.append((_down_size(sizes[-1][0], k), _down_size(sizes[-1][1], k)))
        fh, fw = sizes[-1]
        feat = prev * fh * fw
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.hidden = (
            nn.Sequential(nn.Linear(feat, cfg.hidden_dim), act()) if cfg.hidden_dim else nn.Identity()
        )
        head_in = cfg.hidden_dim or feat
        self.to_mu, self.to_logvar = nn.Linear(head_in, cfg.latent_dim), nn.Linear(head_in, cfg.latent_dim)

        # Decoder mirrors the encoder; output_padding picks the exact size each stride-2 conv came from.
        dec: list[nn.Module] = [nn.Linear(cfg.latent_dim, feat), act(), nn.Unflatten(1, (prev, fh, fw))]
        for i in range(len(cfg.channels) - 1, -1, -1):
            (th, tw), (ih, iw) = sizes[i], sizes[i + 1]
            base_h, base_w = (ih - 1) * 2 - 2 * (k // 2) + k, (iw - 1) * 2 - 2 * (k // 2) + k
            out_ch = cfg.channels[i]
            dec += [
                nn.ConvTranspose2d(prev, out_ch, k, 2, k // 2, output_padding=(th - base_h, tw - base_w)),
                _norm(cfg.norm, out_ch),
                act(),
            ]
            prev = out_ch
        out = likelihood.param_channels(c)
        dec.append(nn.Conv2d(prev, out, k, padding=k // 2))  # the notebooks' final stride-1 (transposed) conv
        self.decoder = nn.Sequential(*dec)


class MlpVAE(DenseHeadVAE):
    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int], likelihood: Likelihood):
        super().__init__()
        self.latent_dim, self.image_shape, self.likelihood = cfg.latent_dim, image_shape, likelihood
        act = ACTIVATIONS[cfg.activation]
        pixels = math.prod(image_shape)
        enc: list[nn.Module] = [nn.Flatten()]
        prev = pixels
        for width in cfg.hidden_sizes:
            enc += [nn.Linear(prev, width), act()]
            prev = width
        self.encoder = nn.Sequential(*enc)
        self.hidden = nn.Identity()
        self.to_mu, self.to_logvar = nn.Linear(prev, cfg.latent_dim), nn.Linear(prev, cfg.latent_dim)
        dec: list[nn.Module] = []
        prev = cfg.latent_dim
        for width in reversed(cfg.hidden_sizes):
            dec += [nn.Linear(prev, width), act()]
            prev = width
        c, h, w = image_shape
        out = likelihood.param_channels(c)
        dec += [nn.Linear(prev, out * h * w), nn.Unflatten(1, (out, h, w))]
        self.decoder = nn.Sequential(*dec)
