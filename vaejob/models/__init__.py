"""VAE families behind one interface (``vaejob.models.base``): ``build_model(model_cfg, loss_cfg, image_shape)``.

- ``conv``, ``mlp``: the seed notebooks' models (``conv.py``);
- ``resnet``: the Stable Diffusion KL autoencoder's shape at small scale (``resnet.py``);
- ``hvae``: a hierarchical VAE of the VDVAE / NVAE family (``hvae.py``).

With ``loss.spectral_reg`` > 0 the model carries NVAE's spectral regulariser as ``model.spectral``.
"""

from __future__ import annotations

from vaejob.config import ConfigError, LossConfig, ModelConfig
from vaejob.likelihoods import build_likelihood
from vaejob.models.base import VAE, SingleLatentVAE, VAEOutput
from vaejob.models.conv import ConvVAE, MlpVAE
from vaejob.models.hvae import HierarchicalVAE
from vaejob.models.resnet import ResnetVAE
from vaejob.models.spectral import SpectralNorms

__all__ = ["VAE", "SingleLatentVAE", "VAEOutput", "build_model", "min_image_side"]

_FAMILIES = {"conv": ConvVAE, "mlp": MlpVAE, "resnet": ResnetVAE, "hvae": HierarchicalVAE}


def min_image_side(cfg: ModelConfig) -> int:
    """The smallest image side the model's down-sampling stages can take."""
    if cfg.name == "conv":
        return 2 ** len(cfg.channels)
    if cfg.name in ("resnet", "hvae"):
        return 2 ** (len(cfg.channels) - 1)
    return 1


def build_model(cfg: ModelConfig, loss: LossConfig, image_shape: tuple[int, int, int]) -> VAE:
    c, h, w = image_shape
    if min(h, w) < min_image_side(cfg):
        raise ConfigError(
            f"model.channels has {len(cfg.channels)} stages of {cfg.name} but the images are {h}x{w}; "
            "use fewer stages or a larger data.image_size"
        )
    model = _FAMILIES[cfg.name](cfg, image_shape, build_likelihood(loss, c))
    if loss.spectral_reg > 0:
        model.spectral = SpectralNorms(model)
    return model
