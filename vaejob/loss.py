"""The negative ELBO per image, in nats: −log p(x|z) from the decoder's likelihood (``vaejob.likelihoods``)
+ β · KL(q(z|x) || N(0, I)), with β warm-up and free bits.

All math runs in fp32 even under autocast: BCE/KL sums over thousands of pixels lose too much in bf16/fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vaejob.config import LossConfig
from vaejob.likelihoods import Likelihood


@dataclass
class LossOut:
    loss: Tensor  # scalar to minimise (with beta and free bits)
    recon: Tensor  # (N,) reconstruction nats per image
    kl: Tensor  # (N,) true KL nats per image
    kl_per_dim: Tensor  # (N, D)

    @property
    def nelbo(self) -> Tensor:
        """(N,) negative ELBO in nats (beta = 1, no free bits): the number comparable across runs."""
        return self.recon + self.kl


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def beta_at(step: int, cfg: LossConfig) -> float:
    if cfg.beta_warmup_steps <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, step / cfg.beta_warmup_steps)


def vae_loss(
    likelihood: Likelihood,
    params: Tensor,
    x: Tensor,
    mu: Tensor,
    logvar: Tensor,
    cfg: LossConfig,
    beta: float,
    evaluate: bool = False,
) -> LossOut:
    """``evaluate`` measures the reconstruction as evaluation reports it (``Likelihood.eval_nll``)."""
    recon = likelihood.eval_nll(params, x) if evaluate else likelihood.nll(params, x)
    kld = kl_per_dim(mu, logvar)
    kl = kld.sum(1)
    if cfg.free_bits > 0:
        # Free bits on the batch-mean KL of each dimension: dims under the floor get no gradient pressure.
        kl_term = torch.clamp(kld.mean(0), min=cfg.free_bits).sum()
    else:
        kl_term = kl.mean()
    return LossOut(loss=recon.mean() + beta * kl_term, recon=recon, kl=kl, kl_per_dim=kld)


def bits_per_dim(nats: float, image_shape: tuple[int, int, int]) -> float:
    """Nats per image as bits per dimension (C·H·W dims): meaningful for discrete likelihoods only."""
    return nats / (math.prod(image_shape) * math.log(2))
