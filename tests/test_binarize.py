"""What a reported number is (issue 17, bugs 7, 11a, 11d): Bernoulli nats on grey levels are no likelihood,
``data.binarize`` (static / dynamic Bernoulli draws, exact on resume, the same whatever the layout), the val
pass keyed by sample (the same number for any world size or batch size, and vaejob.evaluate's), and dead
hidden units only where a unit can die (ReLU)."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.test_cuda import DEVICES
from tests.util import (
    TRAIN,
    assert_same_run,
    evaluate_json,
    final_params,
    launch_cmd,
    loader,
    metrics,
    reference,
    run,
    tiny_overrides,
)
from vaejob.config import LossConfig, ModelConfig
from vaejob.likelihoods import Bernoulli
from vaejob.loader import make_loader, unit_float
from vaejob.loader.binarize import bernoulli_draw, key_seeds
from vaejob.loss import bits_per_dim, vae_loss
from vaejob.metrics import ElboSums, nll_labels
from vaejob.models import build_model

LEVELS = torch.arange(256, dtype=torch.float32) / 255


# ------------------------------------------------------------------------------------ what the nats are
def test_bce_on_grey_levels_scores_543_nats_and_is_no_likelihood() -> None:
    """A 0.5-grey 28x28 image decoded exactly (p = 0.5 everywhere) scores 784 ln 2 = 543.4 "nats", 1.0
    "bit/dim": BCE with soft targets is the cross-entropy H(x, p) >= H(x) > 0, not -log p(x) of anything."""
    lik = Bernoulli()
    grey = torch.full((1, 1, 28, 28), 0.5)
    nats = lik.eval_nll(torch.zeros(1, 1, 28, 28), grey).item()
    assert nats == pytest.approx(784 * math.log(2), rel=1e-6) and round(nats) == 543
    assert bits_per_dim(nats, (1, 28, 28)) == pytest.approx(1.0, rel=1e-6)
    # ... and no decoder does better on that image: p = 0.5 is the minimum of the cross-entropy
    for logit in (-2.0, -0.1, 0.1, 2.0):
        assert lik.eval_nll(torch.full((1, 1, 28, 28), logit), grey).item() > nats
    # Not normalised: exp(-BCE) of one pixel summed over its 256 grey levels is 128 at p = 0.5, not 1; over
    # the two binary values it is 1 for any p (a Bernoulli likelihood, on binarised images only).
    for logit in (0.0, 1.5):
        params = torch.full((256, 1, 1, 1), logit)
        grey_mass = torch.exp(-lik.eval_nll(params, LEVELS.view(256, 1, 1, 1)).double()).sum().item()
        binary = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
        binary_mass = torch.exp(-lik.eval_nll(params[:2], binary).double()).sum().item()
        assert binary_mass == pytest.approx(1.0, rel=1e-6) and grey_mass > 100
    # What the evaluator and the val records say about such numbers
    assert nll_labels("bernoulli", False, "none") == {
        "likelihood": "bernoulli",
        "binarize": "none",
        "normalized_likelihood": False,
    }
    for binarize in ("static", "dynamic"):
        assert nll_labels("bernoulli", False, binarize)["normalized_likelihood"] is True
    assert nll_labels("discretized_logistic_mixture", True, "none")["normalized_likelihood"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["data.binarize=fixed"], "config key 'data.binarize' is 'fixed'; use one of none|static|dynamic"),
        (
            ["data.binarize=static", "loss.likelihood=gaussian"],
            "config key 'data.binarize' is 'static' but loss.likelihood is 'gaussian'; binarised images "
            "need loss.likelihood=bernoulli (or data.binarize=none)",
        ),
    ],
)
def test_bad_binarize_one_line_exit_2(
    tiny_shards: str, tmp_path: Path, args: list[str], message: str
) -> None:
    cp = run([sys.executable, TRAIN, *tiny_overrides(tiny_shards, tmp_path / "run"), *args], timeout=60)
    lines = cp.stderr.strip().splitlines()
    assert cp.returncode == 2, cp.stderr[-2000:]
    assert len(lines) == 1 and lines[0] == f"vaejob.train: error: {message}", cp.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ the draws
def drawn(*loaders: Any) -> dict[str, np.ndarray]:
    """key -> the image (uint8 C×H×W) each valid sample of one epoch of ``loaders`` came as."""
    out = {}
    for ld in loaders:
        for batch in ld:
            for key, valid, image in zip(batch["key"], batch["valid"].tolist(), batch["image"], strict=True):
                if valid:
                    out[key] = image.numpy()
    return out


def grey_levels(root: str) -> dict[str, np.ndarray]:
    """key -> every sample's uint8 C×H×W image as plain webdataset decodes it."""
    return {k: image.transpose(2, 0, 1) for k, (image, _) in reference(root).items()}


def two_ranks(root: str, **kw: Any) -> list[Any]:
    """Both ranks of a 2-process layout with another batch size and 2 workers per rank."""
    return [
        make_loader(root, "train", 5, rank=r, world_size=2, num_workers=2, raw=True, with_keys=True, **kw)
        for r in range(2)
    ]


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    common = sorted(a.keys() & b.keys())
    assert len(common) > 100
    return float(np.mean([(a[k] == b[k]).mean() for k in common]))


def test_static_draw_is_one_fixed_image_per_key(tiny_shards: str) -> None:
    grey = grey_levels(tiny_shards)
    static = drawn(loader(tiny_shards, raw=True, num_workers=0, binarize="static"))
    # another epoch, another seed, another layout (2 ranks x batch 5 x 2 workers): the same image per key
    other = drawn(*two_ranks(tiny_shards, binarize="static", seed=7, epoch=3))
    assert agreement(static, other) == 1.0
    pixels = np.stack([static[k] for k in sorted(static)])
    x = np.stack([grey[k] for k in sorted(static)])
    assert set(np.unique(pixels)) <= {0, 255}
    assert (pixels[x == 0] == 0).all() and (pixels[x == 255] == 255).all()
    inner = (x > 0) & (x < 255)
    assert inner.sum() > 10_000
    assert (pixels[inner] == 255).mean() == pytest.approx((x[inner] / 255).mean(), abs=0.01)
    floats = drawn(loader(tiny_shards, num_workers=0, binarize="static"))  # raw=False: floats 0.0 / 1.0
    assert all(np.array_equal(floats[k], static[k] / 255) for k in static)


def test_dynamic_draw_is_fresh_each_epoch_and_exact_on_resume(tiny_shards: str) -> None:
    def epoch(e: int, seed: int = 3) -> dict[str, np.ndarray]:
        return drawn(loader(tiny_shards, raw=True, num_workers=0, binarize="dynamic", seed=seed, epoch=e))

    grey = grey_levels(tiny_shards)
    e0, e1 = epoch(0), epoch(1)
    # (seed, epoch, key) fixes the draw, whatever the layout
    assert agreement(e0, drawn(*two_ranks(tiny_shards, binarize="dynamic", seed=3, epoch=0))) == 1.0
    # Each epoch a fresh, independent draw: two draws of pixel x agree with probability p² + (1 - p)²
    p = {k: v / 255 for k, v in grey.items()}
    independent = float(
        np.mean([(p[k] ** 2 + (1 - p[k]) ** 2).mean() for k in sorted(e0.keys() & e1.keys())])
    )
    assert independent < 0.9
    assert agreement(e0, e1) == pytest.approx(independent, abs=0.01)
    assert agreement(e0, epoch(0, seed=4)) == pytest.approx(independent, abs=0.01)
    assert agreement(e0, drawn(loader(tiny_shards, raw=True, num_workers=0, binarize="static"))) == (
        pytest.approx(independent, abs=0.01)
    )

    def layout() -> Any:
        return loader(tiny_shards, raw=True, num_workers=2, binarize="dynamic", seed=3, epoch=1)

    full = [b["image"].clone() for b in layout()]
    first = layout()
    head = [b["image"].clone() for _, b in zip(range(3), first, strict=False)]
    resumed = layout()
    resumed.load_state_dict(first.state_dict())  # mid-epoch: the remaining batches draw exactly as before
    rest = [b["image"] for b in resumed]
    assert len(head + rest) == len(full) > 3
    assert all(torch.equal(a, b) for a, b in zip(head + rest, full, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_bernoulli_draw_statistics_and_device_independence(device: str) -> None:
    """P(255) = x / 255 to 2^-24 (24 bits of a keyed integer hash per pixel); neighbouring pixels and images
    are uncorrelated; integer arithmetic, so the CPU and the GPU draw the same bits."""
    keys = [f"img{i:05d}" for i in range(200)]
    seeds = key_seeds("test", keys)
    for level in (0, 1, 64, 128, 254, 255):
        x = torch.full((200, 3, 16, 16), level, dtype=torch.uint8)
        bits = bernoulli_draw(x.to(device), seeds).cpu()
        assert bits.dtype == torch.uint8 and set(bits.unique().tolist()) <= {0, 255}
        ones = (bits == 255).double()
        sd = math.sqrt(level / 255 * (1 - level / 255) / ones.numel())
        assert abs(ones.mean().item() - level / 255) <= 4 * sd + 1e-12, level
        assert torch.equal(bits, bernoulli_draw(x, seeds))  # CPU and `device`: the same bits
        if level == 128:
            flat = ones.flatten(1) - ones.mean()
            neighbours = (flat[:, 1:] * flat[:, :-1]).mean() / flat.pow(2).mean()
            images = (flat[1:] * flat[:-1]).mean() / flat.pow(2).mean()
            assert abs(neighbours) < 0.01 and abs(images) < 0.01


# --------------------------------------------------------------------------------------- real training
TINY = {"samples.final_plots": "false", "wandb.mode": "disabled", "model.hidden_dim": 8}


def train(shards: str, run_dir: Path, nproc: int = 1, **kw: Any) -> None:
    cp = run(launch_cmd(nproc) + tiny_overrides(shards, run_dir, **{**TINY, **kw}))
    assert cp.returncode == 0, cp.stderr[-3000:]


def assert_same_numbers(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """Float64 sums of the same per-image values, reduced in another order: equal to 1e-9 relative."""
    for key in keys:
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=0), (what, key)


NUMBERS = ("nelbo", "recon", "kl", "iw_nll")


@pytest.mark.slow
def test_val_pass_is_keyed_by_sample_not_by_rank_or_batch(tiny_shards: str, tmp_path: Path) -> None:
    """11a: the val −ELBO training logs for the same weights is the same with 1 or 2 processes and batch 8
    or 5, and it is vaejob.evaluate's on that checkpoint (each image's noise seeded by (seed, key))."""
    # lr 1e-30: the one step moves no weight off its initial value (the same on every rank and in every run)
    kw = {"train.max_steps": 1, "train.lr": 1e-30, "train.warmup_steps": 0, "loss.iw_samples": 2}
    layouts = {"1x8": (1, 8), "2x8": (2, 8), "1x5": (1, 5)}
    for name, (nproc, batch) in layouts.items():
        train(tiny_shards, tmp_path / name, nproc, **kw, **{"train.batch_size": batch})
    ref_weights = final_params(tmp_path / "1x8")
    vals = {}
    for name in layouts:
        weights = final_params(tmp_path / name)
        assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights), name
        [vals[name]] = metrics(tmp_path / name, "val")
    ref = vals["1x8"]
    assert ref["hidden_units"] == 8 and ref["iw_samples"] == 2
    for name, rec in vals.items():
        assert_same_numbers(rec, ref, NUMBERS, name)
        for key in ("count", "active_units", "dead_hidden_units", "likelihood", "binarize"):
            assert rec[key] == ref[key], (name, key)
    assert (ref["likelihood"], ref["binarize"], ref["normalized_likelihood"]) == ("bernoulli", "none", False)
    ev = evaluate_json(tmp_path / "2x8", 1, "--iw-samples", "2", "--batch-size", "7")  # --seed 0 = train.seed
    assert_same_numbers(ev, ref, NUMBERS, "evaluate")
    assert ev["count"] == ref["count"] and ev["dead_hidden_units"] == ref["dead_hidden_units"]
    assert (ev["likelihood"], ev["binarize"], ev["normalized_likelihood"]) == ("bernoulli", "none", False)


@pytest.mark.slow
def test_dynamic_run_resumes_exactly_and_is_measured_on_the_static_draw(
    tiny_shards: str, tmp_path: Path
) -> None:
    """data.binarize=dynamic through the real job: resuming at step 20 (epoch 0; epoch 1 starts at step 31)
    gives the uninterrupted run's weights and numbers; the val pass and vaejob.evaluate measure the fixed
    per-key draw and agree; the records say which setting produced them."""
    kw = {
        "data.binarize": "dynamic",
        "train.max_steps": 40,
        "train.eval_every": 20,
        "train.checkpoint_every": 20,
    }
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_shards, straight, **kw)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000040")
    train(tiny_shards, resumed, **kw)
    assert_same_run(straight, resumed)
    assert metrics(resumed, "train")[-1]["epoch"] == 1  # the resumed part crossed into a new epoch's draw
    val = metrics(straight, "val")[-1]
    assert (val["step"], val["likelihood"], val["binarize"], val["normalized_likelihood"]) == (
        40,
        "bernoulli",
        "dynamic",
        True,
    )
    ev = evaluate_json(straight, 2, "--iw-samples", "1", "--batch-size", "5")
    assert_same_numbers(ev, val, ("nelbo", "recon", "kl"), "evaluate")
    assert (ev["binarize"], ev["normalized_likelihood"]) == ("dynamic", True)
    static = tmp_path / "static"  # a static run is measured on the same draw: its own val equals evaluate's
    train(tiny_shards, static, **{**kw, "data.binarize": "static", "train.max_steps": 20})
    ev = evaluate_json(static, 1, "--iw-samples", "1")
    assert_same_numbers(ev, metrics(static, "val")[-1], ("nelbo", "recon", "kl"), "static")


# ---------------------------------------------------------------------------------------- dead units
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "gelu", "elu"])
def test_dead_hidden_units_only_where_a_unit_can_die(tiny_shards: str, activation: str) -> None:
    """11d: four of eight bottleneck units get a pre-activation <= -1 on every image (zero weights, bias -1).
    Under ReLU they output 0 and get no gradient: dead, and counted. Under the other activations the same
    units output < 0 and still get a gradient: not dead, and no dead-unit count is reported."""
    torch.manual_seed(0)
    cfg = ModelConfig(channels=[8, 16], latent_dim=4, hidden_dim=8, activation=activation)
    model = build_model(cfg, LossConfig(), (3, 16, 16))
    linear = model.hidden[0]
    with torch.no_grad():
        linear.weight[:4] = 0
        linear.bias[:4] = -1.0
    sums = ElboSums(model.latent_groups, 4, model.hidden_units, torch.device("cpu"))
    for batch in loader(tiny_shards, "val", 16, raw=True, num_workers=0):
        x, labels = unit_float(batch["image"][batch["valid"]]), batch["label"][batch["valid"]]
        out = model.top_down(model.bottom_up(x), torch.zeros(len(x), 4))
        loss = vae_loss(model.likelihood, out, x, LossConfig(), 1.0, evaluate=True)
        loss.loss.backward()
        with torch.no_grad():
            out = model.top_down(model.bottom_up(x), torch.zeros(len(x), 4))
            loss = vae_loss(model.likelihood, out, x, LossConfig(), 1.0, evaluate=True)
            sums.add(loss, out.mean, labels, out.hidden, None)
    record = sums.result((3, 16, 16), None, False)
    starved = linear.bias.grad[:4].abs()
    if activation == "relu":
        assert (record["dead_hidden_units"], record["hidden_units"]) == (4, 8)
        assert (starved == 0).all()
    else:
        assert "dead_hidden_units" not in record and "hidden_units" not in record
        assert model.hidden_units == 0
        assert (starved > 0).all()
