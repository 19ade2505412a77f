"""The benchmarks in their reduced CI form: they run end to end and produce sane numbers (never timing asserts)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FASHION_MNIST_DIR, FASHION_MNIST_FILES
from tests.util import REPO, cpu_env

pytestmark = pytest.mark.slow


def _bench(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = cpu_env()
    env.pop("OMP_NUM_THREADS")  # the benchmarks run with the machine's default threads, as users do
    cp = subprocess.run(
        [sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    return cp


def test_time_to_quality_quick(tmp_path):
    missing = [f for f in FASHION_MNIST_FILES if not (Path(FASHION_MNIST_DIR) / f).is_file()]
    if missing:
        pytest.skip(f"Fashion-MNIST not in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist")
    out = tmp_path / "ttq.json"
    cp = _bench(
        ["benchmarks/time_to_quality.py", "--quick", "--work", str(tmp_path), "--json", str(out)], timeout=600
    )
    assert re.search(r"seed\s+side\s+epoch\s+wall s\s+val -ELBO", cp.stdout), cp.stdout
    assert "Wall s to reach the val -ELBO" in cp.stdout and "judged on the full run only" in cp.stdout
    results = json.loads(out.read_text())
    assert list(results) == ["0"]
    assert list(results["0"]) == ["seed", "vaejob 2x1"]  # the default launch: 2 processes x 1 thread
    for side, res in results["0"].items():
        evals = res["evals"]
        assert len(evals) >= 2, (side, evals)
        nelbo = [e["nelbo"] for e in evals]
        wall = [e["wall_s"] for e in evals]
        assert all(math.isfinite(v) and 0 < v < 2000 for v in nelbo), (side, nelbo)
        assert nelbo[-1] < nelbo[0], (side, nelbo)  # it learns
        assert all(0 < a < b for a, b in zip(wall, wall[1:], strict=False)), (side, wall)
        assert wall[-1] <= res["total_s"]
        assert all(0 <= e["active_units"] <= 16 for e in evals)
    seed_evals = results["0"]["seed"]["evals"]
    assert all(0 <= e["dead_hidden_units"] <= e["hidden_units"] == 16 for e in seed_evals)


def test_train_throughput_quick():
    cp = _bench(["benchmarks/train_throughput.py", "--rounds", "2", "--chunk", "10", "--warmup", "3"], 300)
    m = re.search(r"trainer / bare = ([0-9.]+)", cp.stdout)
    assert m, cp.stdout
    assert 0.2 < float(m.group(1)) < 5  # a sanity bound, not a speed target: CI machines are noisy
    rates = re.findall(r"^(bare|trainer)\s+(\d+)", cp.stdout, flags=re.M)
    assert [k for k, _ in rates] == ["bare", "trainer"] and all(int(v) > 0 for _, v in rates)


def test_data_throughput_quick(tmp_path):
    cp = _bench(
        ["benchmarks/data_throughput.py", "--num", "2000", "--repeats", "1", "--dir", str(tmp_path)], 300
    )
    rows = dict(
        re.findall(r"^(imagefolder|webdataset|vaejob-npy|read-only|vaejob-png)\s+([0-9,]+)", cp.stdout, re.M)
    )
    assert sorted(rows) == sorted(["imagefolder", "webdataset", "vaejob-npy", "read-only", "vaejob-png"]), (
        cp.stdout
    )
    assert all(int(v.replace(",", "")) > 0 for v in rows.values())
    for peer in ("imagefolder", "webdataset"):  # the two ratios the README's loader table quotes
        m = re.search(rf"^vaejob-npy / {peer}: ([0-9.]+)x img/s", cp.stdout, re.M)
        assert m and float(m.group(1)) > 0, cp.stdout


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: gpu_check.py would measure it (minutes)")
    cp = _bench(["benchmarks/gpu_check.py"], timeout=120)
    assert cp.stdout.strip().splitlines() == [cp.stdout.strip()]  # one line
    assert cp.stdout.startswith("gpu_check: no CUDA GPU here") and "exiting 0" in cp.stdout


def test_gpu_check_tests_section_reports_each_selected_test(tmp_path):
    """The tests section on the CPU cases, narrowed with --tests-k as a short GPU lease would: one record each."""
    out = tmp_path / "check.json"
    args = ["benchmarks/gpu_check.py", "--device", "cpu", "--sections", "tests", "--json", str(out)]
    cp = _bench([*args, "--tests-k", "mixed_precision and conv"], timeout=300)
    tests = json.loads(out.read_text())["sections"]["tests"]
    assert (
        tests["marker"] == "not cuda" and tests["k"] == "mixed_precision and conv" and tests["exit_code"] == 0
    )
    outcomes = {t["test"]: t["outcome"] for t in tests["tests"]}
    prefix = "test_mixed_precision_with_the_loss_in_fp32_and_channels_last"
    assert outcomes == {f"{prefix}[cpu-bf16-conv]": "passed", f"{prefix}[cpu-fp16-conv]": "skipped"}, (
        cp.stdout
    )
    assert "-k 'mixed_precision and conv': exit 0" in cp.stdout


def test_gpu_check_sections_run_on_the_cpu(tmp_path):
    """Every section but the CUDA tests (tests/test_cuda.py runs their CPU cases itself), at toy sizes."""
    out = tmp_path / "check.json"
    args = ["benchmarks/gpu_check.py", "--device", "cpu", "--sections", "env,throughput,loader,ttq"]
    args += [
        "--specs",
        "fashion_mnist@32",
        "--rounds",
        "2",
        "--chunk",
        "5",
        "--warmup",
        "2",
        "--workers",
        "0,1",
    ]
    args += ["--loader-images", "1000", "--loader-epochs", "1", "--fmnist-limit", "3000", "--json", str(out)]
    args += ["--work", str(tmp_path / "work"), "--ttq-set", "train.max_steps=40", "train.eval_every=20"]
    cp = _bench(args, timeout=600)
    result = json.loads(out.read_text())
    assert result["complete"] and result["device"] == "cpu"
    s = result["sections"]
    assert set(s["env"]["auto"]) == {"train.mixed_precision", "data.num_workers"}
    assert s["env"]["auto"]["data.num_workers"].startswith("0 (training on the CPU")
    (row,) = s["throughput"]
    assert row["config"] == "fashion_mnist" and row["batch_size"] == 32 and row["shape"] == [1, 28, 28]
    assert (
        row["trainer"] > 0 and row["bare"] > 0 and row["ratio"] == pytest.approx(row["trainer"] / row["bare"])
    )
    rates = {(r["config"], r["workers"]): r["images_per_s"] for r in s["loader"]["rates"]}
    assert set(rates) == {(c, w) for c in ("fashion_mnist", "synthetic64") for w in (0, 1)}
    assert all(v > 0 for v in rates.values())
    (verdict,) = s["loader"]["vs_training"]  # the loader against the step rate it must feed
    assert verdict["auto_workers"] == 0 and verdict["loader_at_auto"] == rates[("fashion_mnist", 0)]
    assert verdict["auto_keeps_up"] == (rates[("fashion_mnist", 0)] >= row["trainer"])
    ttq = s["ttq"]
    if "error" in ttq:  # no Fashion-MNIST files on this machine
        assert "no Fashion-MNIST files" in ttq["error"] and "ttq: no Fashion-MNIST files" in cp.stdout
    else:
        assert [e["step"] for e in ttq["evals"]] == [20, 40] and ttq["images_per_step"] == 64
        assert all(0 < e["nelbo"] < 2000 for e in ttq["evals"]) and ttq["total_s"] > 0
        assert "time to quality, configs/fashion_mnist.yaml on 1 device(s), 64 images a step" in cp.stdout
    for table in ("config            variant", "loader, uint8 batches of 256"):
        assert table in cp.stdout, cp.stdout[-3000:]


def test_decode_throughput_quick(tmp_path):
    cp = _bench(
        [
            "benchmarks/decode_throughput.py",
            "--num",
            "200",
            "--batch-size",
            "32",
            "--repeats",
            "1",
            "--dir",
            str(tmp_path),
        ],
        300,
    )
    rows = dict(
        re.findall(r"^(pil|pil-draft-1x|pil-draft-2x|torchvision-cpu)\s+([0-9,]+)\s", cp.stdout, re.M)
    )
    assert sorted(rows) == ["pil", "pil-draft-1x", "pil-draft-2x", "torchvision-cpu"], cp.stdout
    assert "vaejob's codec uses pil-draft-2x" in cp.stdout
    m = re.search(r"^vaejob / webdataset on JPEG shards: ([0-9.]+)x img/s", cp.stdout, re.M)
    assert m and float(m.group(1)) > 0, cp.stdout  # the ratio the README quotes


def test_storage_throughput_quick():
    pytest.importorskip("moto", reason="the dev extra's moto[server] runs the S3 endpoint")
    cp = _bench(["benchmarks/storage_throughput.py", "--num", "1000", "--repeats", "1"], 300)
    rows = dict(re.findall(r"^(local|s3|s3-fsspec)\s+([0-9,]+)\s", cp.stdout, re.M))
    assert sorted(rows) == ["local", "s3", "s3-fsspec"] and all(
        int(v.replace(",", "")) > 0 for v in rows.values()
    )
    m = re.search(r"^s3 / local: ([0-9.]+)x img/s", cp.stdout, re.M)
    assert m and float(m.group(1)) > 0, cp.stdout  # the ratio the README quotes


def test_quality_reduced(fmnist_shards, tmp_path):
    """Every family trains a few hundred steps through the real job, is evaluated by vaejob.evaluate and beats
    its start; a second call stops hvae at a tiny wall-clock budget (SIGUSR1) and still evaluates it."""
    out = tmp_path / "quality.json"
    steps = 150
    sets = [
        f"train.max_steps={steps}",
        "train.batch_size=16",
        "train.warmup_steps=10",
        "train.log_every=10",
        "train.eval_every=50",
        "train.checkpoint_every=50",
        f"train.sample_every={steps}",
        "samples.final_plots=false",
        "wandb.mode=disabled",
    ]
    args = ["benchmarks/quality.py", "--shards", fmnist_shards, "--work", str(tmp_path / "work")]
    args += ["--iw-samples", "10", "--fid", "0", "--json", str(out), "--set", *sets]
    cp = _bench(args, timeout=1500)
    assert re.search(r"family\s+val -ELBO\s+IW-NLL\s+bits/dim", cp.stdout), cp.stdout
    assert "margins vs conv" in cp.stdout
    results = json.loads(out.read_text())
    assert list(results) == ["conv", "resnet", "hvae"]
    val_count = json.loads((Path(fmnist_shards) / "manifest.json").read_text())["splits"]["val"]["count"]
    for family, res in results.items():
        train, ev = res["train"], res["eval"]
        assert train["state"] == "completed" and train["step"] == steps, (family, train)
        assert ev["step"] == steps and ev["count"] == val_count and ev["iw_samples"] == 10, family
        assert ev["likelihood"] == "discretized_logistic_mixture"
        assert math.isfinite(ev["nelbo"]) and math.isfinite(ev["iw_nll"]), (family, ev)
        assert ev["iw_nll"] < ev["nelbo"], family  # the K=10 bound is tighter than the one-sample ELBO
        assert ev["nelbo"] < 0.9 * train["first_train_loss"], (family, ev["nelbo"], train)  # it learned
        assert [v["step"] for v in train["val"]] == [50, 100, 150], family
    # fashion_mnist_hvae.yaml: groups [0, 1, 2, 1, 1]
    assert len(results["hvae"]["eval"]["kl_per_group"]) == 5
    # the wall-clock budget: SIGUSR1 checkpoints the job, which is evaluated where it stopped
    budget = tmp_path / "budget.json"
    args = ["benchmarks/quality.py", "--shards", fmnist_shards, "--work", str(tmp_path / "budget")]
    args += ["--families", "hvae", "--budget-s", "40", "--iw-samples", "2", "--json", str(budget)]
    args += ["--set", "train.max_steps=100000", "train.batch_size=16", "wandb.mode=disabled"]
    _bench(args, timeout=900)
    stopped = json.loads(budget.read_text())["hvae"]
    assert stopped["train"]["state"] == "preempted" and 0 < stopped["train"]["step"] < 100000
    assert stopped["eval"]["step"] == stopped["train"]["step"]
