"""The training objective per image, in nats: the negative ELBO −log p(x|z) + β · KL(q(z|x) || p(z)) (β warm-up,
free bits), or with ``loss.iw_samples`` = K > 1 the negative IWAE bound (Burda et al. 2016)
−log 1/K Σ_k p(x|z_k) (p(z_k) / q(z_k|x))^β over K posterior samples per image. The KL is whatever the model
reports per latent unit (``VAEOutput.kl``: analytic, and for a hierarchical model given the groups before it).

All math runs in fp32 even under autocast: BCE/KL sums over thousands of pixels lose too much in bf16/fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vaejob.config import LossConfig
from vaejob.likelihoods import Likelihood
from vaejob.models.base import VAEOutput


@dataclass
class LossOut:
    loss: Tensor  # scalar to minimise (with beta and free bits, or the IWAE bound)
    recon: Tensor  # (N,) reconstruction nats per image
    kl: Tensor  # (N,) true KL nats per image
    kl_per_dim: Tensor  # (N, D)

    @property
    def nelbo(self) -> Tensor:
        """(N,) negative ELBO in nats (beta = 1, no free bits): the number comparable across runs."""
        return self.recon + self.kl


def beta_at(step: int, cfg: LossConfig) -> float:
    if cfg.beta_warmup_steps <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, step / cfg.beta_warmup_steps)


def vae_loss(
    likelihood: Likelihood,
    out: VAEOutput,
    x: Tensor,
    cfg: LossConfig,
    beta: float,
    evaluate: bool = False,
    samples: int = 1,
) -> LossOut:
    """``out`` holds ``samples`` posterior samples per image of ``x`` (image-major rows, ``VAE.forward``);
    ``evaluate`` measures the reconstruction as evaluation reports it (``Likelihood.eval_nll``). recon, kl and
    kl_per_dim are per image (the mean over its samples)."""
    target = x if samples == 1 else x.repeat_interleave(samples, 0)
    recon = likelihood.eval_nll(out.params, target) if evaluate else likelihood.nll(out.params, target)
    kld = out.kl.float()
    kl = kld.sum(1)
    if samples > 1:
        log_w = (-recon + beta * (out.log_p - out.log_q)).view(-1, samples)
        loss = -(torch.logsumexp(log_w, dim=1) - math.log(samples)).mean()
        recon, kl, kld = (v.view(-1, samples, *v.shape[1:]).mean(1) for v in (recon, kl, kld))
        return LossOut(loss=loss, recon=recon, kl=kl, kl_per_dim=kld)
    if cfg.free_bits > 0:
        # Free bits on the batch-mean KL of each dimension: dims under the floor get no gradient pressure.
        kl_term = torch.clamp(kld.mean(0), min=cfg.free_bits).sum()
    else:
        kl_term = kl.mean()
    return LossOut(loss=recon.mean() + beta * kl_term, recon=recon, kl=kl, kl_per_dim=kld)


def bits_per_dim(nats: float, image_shape: tuple[int, int, int]) -> float:
    """Nats per image as bits per dimension (C·H·W dims): meaningful for discrete likelihoods only."""
    return nats / (math.prod(image_shape) * math.log(2))
