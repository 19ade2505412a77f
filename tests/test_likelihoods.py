"""The decoder likelihoods: discrete ones are distributions over the 256 levels; bits/dim mean what they say."""

from __future__ import annotations

import math

import pytest
import torch

from tests.util import launch_cmd, metrics, run, tiny_overrides
from vaejob.config import LossConfig
from vaejob.likelihoods import DiscretizedGaussian, DiscretizedLogisticMixture, Gaussian, build_likelihood
from vaejob.loss import bits_per_dim

LEVELS = torch.arange(256, dtype=torch.float32) / 255


def gray_pixels() -> torch.Tensor:
    return LEVELS.view(256, 1, 1, 1)


def random_params(likelihood, channels: int, n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, likelihood.param_channels(channels), 1, 1, generator=g) * 2


DISCRETE = [
    ("discretized_gaussian", {"scale": "channel"}),
    ("discretized_gaussian", {"scale": "pixel"}),
    ("discretized_logistic_mixture", {"mixtures": 4}),
    ("gaussian", {"gaussian_std": 0.1}),
]


@pytest.mark.parametrize(("name", "kw"), DISCRETE)
def test_a_grayscale_pixel_s_256_masses_sum_to_one(name: str, kw: dict) -> None:
    for seed in range(3):
        lik = build_likelihood(LossConfig(likelihood=name, **kw), 1)
        assert lik.discrete
        params = random_params(lik, 1, seed=seed).expand(256, -1, -1, -1)
        mass = torch.exp(-lik.eval_nll(params, gray_pixels()).double())
        assert mass.sum().item() == pytest.approx(1.0, abs=2e-3), (name, seed)
        assert (mass >= 0).all()


def test_an_rgb_pixel_s_256_cubed_masses_sum_to_one() -> None:
    """The mixture couples the channels (green depends on red, blue on both): the joint over all 16.7M colours."""
    lik = DiscretizedLogisticMixture(3, mixtures=3)
    params = random_params(lik, 3, seed=1)
    r, g, b = torch.meshgrid(LEVELS, LEVELS, LEVELS, indexing="ij")
    colours = torch.stack([r.flatten(), g.flatten(), b.flatten()], 1).view(-1, 3, 1, 1)
    total = 0.0
    for chunk in colours.split(1 << 20):
        total += torch.exp(-lik.nll(params.expand(len(chunk), -1, -1, -1), chunk).double()).sum().item()
    assert total == pytest.approx(1.0, abs=2e-3)


def test_bits_per_dim_of_known_distributions() -> None:
    lik = DiscretizedLogisticMixture(1, mixtures=1)
    wide = torch.tensor([0.0, 0.0, 3.0]).view(1, 3, 1, 1)  # one logistic, mean 0, scale e^3, on [-1, 1]
    x = torch.rand(64, 1, 1, 1).mul(254).round().add(1) / 255 * (254 / 255)  # inner levels, never the edges
    bits = bits_per_dim(lik.nll(wide.expand(64, -1, -1, -1), x).mean().item(), (1, 1, 1))
    # nearly flat near the mean: each level's mass is pdf(0) x the bin's width, (1 / 4s) x (2 / 255)
    assert bits == pytest.approx(-math.log2((2 / 255) / (4 * math.exp(3.0))), rel=1e-3)
    sharp = torch.tensor([0.0, 2 * 100 / 255 - 1, -7.0]).view(1, 3, 1, 1)  # centred on level 100, tiny scale
    level = torch.full((1, 1, 1, 1), 100 / 255)
    s, h = math.exp(-7.0), 1 / 255  # the smallest scale a decoder can reach, half a level's width
    mass = 1 / (1 + math.exp(-h / s)) - 1 / (1 + math.exp(h / s))  # ~97% of the mass on level 100
    assert bits_per_dim(lik.nll(sharp, level).item(), (1, 1, 1)) == pytest.approx(-math.log2(mass), rel=1e-3)


def test_the_gaussian_reports_a_discrete_nll_even_where_its_density_is_negative() -> None:
    lik = Gaussian(0.1)
    x = torch.rand(4, 3, 8, 8).mul(255).round() / 255
    perfect = torch.logit(x.clamp(1e-4, 1 - 1e-4))  # the decoder's mean is exactly the image
    continuous, discrete = lik.nll(perfect, x), lik.eval_nll(perfect, x)
    assert (continuous < 0).all()  # -1.38 nats a pixel: not a number to report
    assert (discrete > 0).all() and bits_per_dim(discrete.mean().item(), (3, 8, 8)) < 8


@pytest.mark.parametrize(
    "lik", [DiscretizedGaussian(3, "pixel"), DiscretizedLogisticMixture(3, 5), Gaussian(0.1)]
)
def test_likelihoods_run_in_fp32_under_autocast(lik) -> None:
    params = torch.randn(2, lik.param_channels(3), 4, 4).to(torch.bfloat16)
    x = torch.rand(2, 3, 4, 4).mul(255).round() / 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lik.eval_nll(params, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, lik.eval_nll(params.float(), x), rtol=1e-5, atol=1e-4)


def test_means_are_images_in_range() -> None:
    for lik, c in (
        (DiscretizedGaussian(1, "channel"), 1),
        (DiscretizedLogisticMixture(3, 4), 3),
        (Gaussian(0.1), 3),
    ):
        mean = lik.mean(torch.randn(5, lik.param_channels(c), 6, 6) * 3)
        assert mean.shape == (5, c, 6, 6) and 0 <= mean.min() and mean.max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["discretized_logistic_mixture", "discretized_gaussian", "gaussian"])
def test_an_rgb_run_reports_bits_per_dim_in_a_sane_range(tiny_shards, tmp_path, likelihood) -> None:
    run_dir = tmp_path / likelihood
    kw = {"loss.likelihood": likelihood, "loss.mixtures": 3, "train.max_steps": 40, "wandb.mode": "disabled"}
    cp = run(launch_cmd(1) + tiny_overrides(tiny_shards, run_dir, **kw))
    assert cp.returncode == 0, cp.stderr[-3000:]
    val = metrics(run_dir, "val")
    assert all(v["bits_per_dim"] > 0 for v in val), val  # a distribution over levels: never below zero
    if (
        likelihood != "gaussian"
    ):  # a learned scale beats a uniform distribution over the 256 levels; the fixed
        assert val[-1]["bits_per_dim"] < 8, val  # sigma = 0.1 cannot go below 6 bits/dim even when exact
    assert all(v["bits_per_dim"] == pytest.approx(v["nelbo"] / (3 * 16 * 16 * math.log(2))) for v in val)
    assert val[-1]["nelbo"] < val[0]["nelbo"]  # it learns


@pytest.mark.parametrize("log_scale", [3.0, 10.0, 37.0])
def test_a_wide_discretized_gaussian_keeps_its_small_masses_finite_and_right(log_scale: float) -> None:
    # A scale far above a level's width (the log scale of a diverging or barely trained decoder) used to give
    # -inf: the two log-CDFs agree in float32, so 1 - exp(difference) rounded to 0.
    lik = DiscretizedGaussian(1, "channel")
    with torch.no_grad():
        lik.log_scale.fill_(log_scale)
    x = LEVELS[1:255].view(-1, 1, 1, 1)  # interior levels: the edge bins hold half the mass each
    nll = lik.nll(torch.zeros_like(x), x)
    sigma = math.exp(log_scale)
    # The bin's mass is the density at the level times its width (2/255 on the [-1, 1] scale), to O((w/σ)²).
    z = (x.double().flatten() * 2 - 1) / sigma
    expected = -(-0.5 * z**2 - 0.5 * math.log(2 * math.pi) + math.log(2 / 255 / sigma))
    assert torch.isfinite(nll).all()
    assert torch.allclose(nll.double(), expected, rtol=1e-4)
