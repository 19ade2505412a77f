"""The model families of vaejob.models: the conv/mlp models unchanged, resnet and hvae shapes, likelihoods,
gradients, KL and density bookkeeping, sampling temperatures, IW bounds and the IWAE objective."""

from __future__ import annotations

import math

import pytest
import torch

from tests.util import TINY_FAMILIES as TINY
from vaejob.config import Config, load_config
from vaejob.loss import vae_loss
from vaejob.metrics import iw_log_px, per_image_noise
from vaejob.models import VAE, build_model
from vaejob.models.spectral import SpectralNorms

LIKELIHOODS = ["bernoulli", "gaussian", "discretized_gaussian", "discretized_logistic_mixture"]
SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]


def make(family: str, shape: tuple[int, int, int], *extra: str, seed: int = 0) -> tuple[Config, VAE]:
    overrides = list(TINY[family])
    if shape[1] == 64:  # one more stage: 64 -> 32 -> 16
        overrides = [
            o.replace("[8,16]", "[8,16,16]").replace("groups=[1,2]", "groups=[0,1,2]") for o in overrides
        ]
    cfg = load_config(None, [*overrides, *extra])
    torch.manual_seed(seed)
    return cfg, build_model(cfg.model, cfg.loss, shape)


def images(n: int, shape: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    """Random images on the 8-bit grid (what the discrete likelihoods expect)."""
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).float() / 255


def blocky(n: int, seed: int = 1) -> torch.Tensor:
    """Binary 28x28 images of 4x4-pixel blocks: structure a model can learn in a few dozen steps."""
    coarse = torch.rand(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed)) > 0.5
    return coarse.float().repeat_interleave(4, 2).repeat_interleave(4, 3)


# --- conv and mlp: the parameter names, shapes and numbers of the models every checkpoint so far holds --------
# Recorded from vaejob/model.py before it became vaejob/models (commit 1f09d25), torch.manual_seed(0).
OLD_CONV_KEYS = [
    ("encoder.0.weight", (32, 1, 3, 3)),
    ("encoder.0.bias", (32,)),
    ("encoder.3.weight", (64, 32, 3, 3)),
    ("encoder.3.bias", (64,)),
    ("to_mu.weight", (16, 3136)),
    ("to_mu.bias", (16,)),
    ("to_logvar.weight", (16, 3136)),
    ("to_logvar.bias", (16,)),
    ("decoder.0.weight", (3136, 16)),
    ("decoder.0.bias", (3136,)),
    ("decoder.3.weight", (64, 64, 3, 3)),
    ("decoder.3.bias", (64,)),
    ("decoder.6.weight", (64, 32, 3, 3)),
    ("decoder.6.bias", (32,)),
    ("decoder.9.weight", (1, 32, 3, 3)),
    ("decoder.9.bias", (1,)),
]
OLD_MLP_KEYS = [
    ("encoder.1.weight", (400, 784)),
    ("encoder.1.bias", (400,)),
    ("to_mu.weight", (16, 400)),
    ("to_mu.bias", (16,)),
    ("to_logvar.weight", (16, 400)),
    ("to_logvar.bias", (16,)),
    ("decoder.0.weight", (400, 16)),
    ("decoder.0.bias", (400,)),
    ("decoder.2.weight", (784, 400)),
    ("decoder.2.bias", (784,)),
]
# (sum mu, sum logvar, sum decode(mu), sum |decode(mu)|) of torch.rand(4, *shape) from Generator seed 1
OLD_CONV_SUMS = (0.04811299650464207, 0.5764505069237202, 29.73131706294953, 31.194911161699565)
OLD_MLP_SUMS = (-0.6749933725222945, -4.682380723068491, 2.569793488131836, 169.19854253379162)
OLD_CONV_GROUP_SUMS = (-0.8582038264721632, -0.7782821292057633, 19688.370573516877, 126970.58719147631)


@pytest.mark.parametrize(
    ("overrides", "shape", "keys", "sums"),
    [
        (["model.name=conv"], (1, 28, 28), OLD_CONV_KEYS, OLD_CONV_SUMS),
        (["model.name=mlp"], (1, 28, 28), OLD_MLP_KEYS, OLD_MLP_SUMS),
        (
            [
                "model.name=conv",
                "model.hidden_dim=32",
                "model.norm=group",
                "loss.likelihood=discretized_logistic_mixture",
            ],
            (3, 32, 32),
            None,
            OLD_CONV_GROUP_SUMS,
        ),
    ],
)
def test_conv_and_mlp_are_the_old_models(overrides, shape, keys, sums) -> None:
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, shape)
    state = model.state_dict()
    if keys is not None:
        assert [(k, tuple(v.shape)) for k, v in state.items()] == keys
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        params = model.decode(mu)
    got = (mu.double().sum(), logvar.double().sum(), params.double().sum(), params.double().abs().sum())
    for g, want in zip(got, sums, strict=True):
        assert g.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    # forward = decode(mu + sigma * eps) with eps from the global RNG, as before
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    eps = torch.randn_like(mu)
    torch.testing.assert_close(out.params, model.decode(mu + torch.exp(0.5 * logvar) * eps))
    assert model.single_latent and model.latent_groups == (16,) and out.kl.shape == (4, 16)


# --- resnet and hvae: shapes, finite losses, every parameter trained -------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("family", ["resnet", "resnet_dense", "hvae"])
def test_shapes_losses_and_gradients(family: str, shape: tuple[int, int, int], likelihood: str) -> None:
    cfg, model = make(family, shape, f"loss.likelihood={likelihood}")
    x = images(3, shape)
    out = model(x)
    p = model.likelihood.param_channels(shape[0])
    assert out.params.shape == (3, p, shape[1], shape[2])
    assert out.kl.shape == out.mean.shape == (3, model.latent_size)
    assert out.log_q.shape == out.log_p.shape == (3,)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # small: the losses are sums over pixels
    # hvae: the top-down start and the prior's last conv are zero (VDVAE's init), so the first group's prior cell
    # has zero input and output at first: its weights get gradients from the third update on
    for _ in range(3):
        opt.zero_grad()
        loss = vae_loss(model.likelihood, model(x), x, cfg.loss, 1.0)
        assert torch.isfinite(loss.loss) and loss.nelbo.shape == (3,)
        loss.loss.backward()
        opt.step()
    dead = [n for n, q in model.named_parameters() if q.grad is None or not q.grad.abs().sum() > 0]
    assert dead == []
    with torch.no_grad():
        means = model.mean_image(model.generate(torch.randn(2, model.latent_size)))
    assert means.shape == (2, *shape) and 0 <= means.min() and means.max() <= 1


def test_resnet_odd_size_and_attention_at_lowest_resolution() -> None:
    cfg = load_config(None, [*TINY["resnet"], "model.channels=[8,8,16]"])
    model = build_model(cfg.model, cfg.loss, (1, 27, 27))
    assert model.sizes == [(27, 27), (14, 14), (7, 7)] and model.latent_dim == 2 * 7 * 7
    assert model(images(2, (1, 27, 27))).params.shape == (2, 1, 27, 27)
    assert any(type(m).__name__ == "Attention" for m in model.enc_mid)


# --- hvae: groups, densities, temperatures ------------------------------------------------------------------


def test_hvae_groups_and_kl_per_group() -> None:
    _, model = make("hvae", (1, 28, 28))
    # groups=[1,2] at 28x28 and 14x14, 2 channels each; top-down order: the lowest resolution first
    assert model.latent_groups == (2 * 14 * 14, 2 * 14 * 14, 2 * 28 * 28)
    out = model(images(4, (1, 28, 28)))
    assert sum(model.latent_groups) == out.kl.shape[1] == model.latent_size
    per_group = [k.sum(1) for k in out.kl.split(model.latent_groups, dim=1)]
    assert all((k >= 0).all() and torch.isfinite(k).all() for k in per_group)
    assert all(k.mean() > 0 for k in per_group)  # every group's posterior differs from its prior


def test_hvae_log_q_minus_log_p_averages_to_the_analytic_kl() -> None:
    """log q - log p at the sampled z is an unbiased estimate of the summed per-group KL: checks the densities
    the IW bound and the IWAE objective use against the KL the ELBO uses."""
    _, model = make("hvae", (1, 28, 28))
    x = images(1, (1, 28, 28)).expand(2000, -1, -1, -1)
    with torch.no_grad():
        out = model(x)
    diff = (out.log_q - out.log_p - out.kl.sum(1)).double()
    assert abs(diff.mean().item()) < 5 * diff.std().item() / math.sqrt(len(diff)) + 1e-3


@torch.no_grad()
def test_hvae_generate_at_temperatures() -> None:
    cfg, model = make("hvae", (1, 28, 28), "loss.likelihood=bernoulli")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = images(16, (1, 28, 28))
    with torch.enable_grad():  # a few steps, so the prior is no longer its N(0, I) start
        for _ in range(5):
            opt.zero_grad()
            vae_loss(model.likelihood, model(x), x, cfg.loss, 1.0).loss.backward()
            opt.step()
    eps = torch.randn(64, model.latent_size, generator=torch.Generator().manual_seed(5))
    spread = {}
    for t in (0.5, 1.0):
        means = model.mean_image(model.generate(eps, t))
        assert means.shape == (64, 1, 28, 28) and 0 <= means.min() and means.max() <= 1
        spread[t] = means.var(0).mean().item()
    assert 0 < spread[0.5] < spread[1.0]
    assert torch.equal(model.generate(eps[:4], 0.5), model.generate(eps[:4], 0.5))  # noise in, image out


@pytest.mark.parametrize("family", ["resnet", "hvae"])
@torch.no_grad()
def test_iw_bound_over_all_groups(family: str) -> None:
    cfg, model = make(family, (1, 28, 28), "loss.likelihood=discretized_logistic_mixture")
    model.eval()
    x = images(4, (1, 28, 28))
    k = 64

    def noise(seed: int):
        return per_image_noise([torch.Generator().manual_seed(seed + i) for i in range(len(x))])

    iw = iw_log_px(model, x, k, noise=noise(0), chunk=k)  # one chunk: the same draws as eps below
    # the same k samples one at a time: their mean log weight is a (single-sample) ELBO, <= log mean exp
    eps = noise(0)(k, model.latent_size)  # (N, k, D)
    log_w = torch.stack(
        [
            (-model.likelihood.eval_nll(o.params, x) + o.log_p - o.log_q).double()
            for o in (model(x, eps=eps[:, j]) for j in range(k))
        ],
        dim=1,
    )
    torch.testing.assert_close(iw, torch.logsumexp(log_w, 1) - math.log(k), rtol=1e-6, atol=1e-3)
    assert (iw >= log_w.mean(1)).all()
    nelbo = vae_loss(model.likelihood, model(x, eps=eps[:, 0]), x, cfg.loss, 1.0, evaluate=True).nelbo
    assert (-iw).mean() < nelbo.double().mean()
    # K = 1: the bound is the single-sample ELBO at that noise
    one = iw_log_px(model, x, 1, noise=noise(1))
    o = model(x, eps=noise(1)(1, model.latent_size)[:, 0])
    single = (-model.likelihood.eval_nll(o.params, x) + o.log_p - o.log_q).double()
    torch.testing.assert_close(one, single, rtol=1e-6, atol=1e-3)


# --- the IWAE objective and the spectral term ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["resnet", "hvae"])
def test_iwae_objective_k1_is_the_elbo_and_k4_trains(family: str) -> None:
    cfg, model = make(family, (1, 28, 28), "loss.likelihood=bernoulli", "loss.iw_samples=4")
    x = blocky(8)
    one = model(x)
    elbo = vae_loss(model.likelihood, one, x, cfg.loss, 1.0, samples=1)
    torch.testing.assert_close(elbo.loss, elbo.nelbo.mean())
    out = model(x, samples=4)
    assert out.params.shape[0] == 32
    iwae = vae_loss(model.likelihood, out, x, cfg.loss, 1.0, samples=4)
    log_w = (-model.likelihood.nll(out.params, x.repeat_interleave(4, 0)) + out.log_p - out.log_q).view(8, 4)
    torch.testing.assert_close(iwae.loss, -(torch.logsumexp(log_w, 1) - math.log(4)).mean())
    assert iwae.recon.shape == iwae.kl.shape == (8,)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = vae_loss(model.likelihood, model(x, samples=4), x, cfg.loss, 1.0, samples=4).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_spectral_term_is_the_sum_of_largest_singular_values() -> None:
    cfg, model = make("hvae", (1, 28, 28), "loss.spectral_reg=0.1")
    term = model.spectral()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    exact = sum(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item() for m in layers)
    assert term.item() > 0 and term.requires_grad
    assert term.item() == pytest.approx(exact, rel=0.02)
    assert len(model.spectral.sigmas()) == len(layers)
    # the buffers travel with the weights (resume continues the same power iteration)
    assert any(k.startswith("spectral.u") for k in model.state_dict())
    assert not any(isinstance(m, SpectralNorms) for m in model.modules() if m is not model.spectral)
