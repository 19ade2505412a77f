"""The new families' job keys: update skipping with a cap, config validation (one line, exit 2), the shipped
configs, and real two-process hvae and resnet runs that resume exactly after SIGUSR1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.util import REPO, assert_same_run, launch_cmd, metrics, run, tiny_overrides
from vaejob.config import ConfigError, load_config
from vaejob.models import build_model
from vaejob.optim import NonFiniteError, StepGuard

HVAE = {
    "model.name": "hvae",
    "model.channels": "[8,16]",
    "model.groups": "[1,1]",
    "model.latent_channels": 2,
    "model.blocks": 1,
    "train.grad_clip": 200.0,
}
RESNET = {
    "model.name": "resnet",
    "model.channels": "[8,16]",
    "model.attention": "true",
    "model.latent_channels": 2,
}


def test_skip_threshold_drops_big_updates_and_caps_consecutive_skips() -> None:
    cfg = load_config(None, ["train.skip_threshold=10", "train.max_consecutive_skips=2"])
    guard = StepGuard(cfg.train, torch.device("cpu"), 1)
    loss = torch.tensor(1.0)
    assert guard.needs_host_sync
    assert not guard.skips(loss, torch.tensor(5.0), 1)
    assert guard.skips(loss, torch.tensor(50.0), 2) and guard.skipped_steps == 1
    assert not guard.skips(loss, torch.tensor(9.0), 3) and guard.consecutive == 0  # a good step: reset
    assert guard.skips(loss, torch.tensor(11.0), 4) and guard.skips(loss, torch.tensor(float("inf")), 5)
    with pytest.raises(
        NonFiniteError, match=r"3 updates in a row skipped at step 6 .*train.skip_threshold 10"
    ):
        guard.skips(loss, torch.tensor(12.0), 6)
    assert guard.skipped_steps == 4 and guard.nonfinite_skips == 0
    off = StepGuard(load_config(None, []).train, torch.device("cpu"), 1)
    assert not off.needs_host_sync and not off.skips(loss, torch.tensor(1e30), 1)
    # Under loss scaling an infinite norm with a finite loss is the scaler's overflow: not dropped, not counted.
    scaled = StepGuard(load_config(None, ["train.on_nonfinite=skip"]).train, torch.device("cpu"), 1)
    assert not scaled.skips(loss, torch.tensor(float("inf")), 1, scaled=True) and scaled.skipped_steps == 0
    assert scaled.skips(torch.tensor(float("nan")), torch.tensor(float("inf")), 2, scaled=True)
    assert scaled.nonfinite_skips == 1


def test_job_stops_when_every_update_is_skipped(tiny_shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_shards,
        run_dir,
        **{"train.skip_threshold": 1e-9, "train.max_consecutive_skips": 3, "wandb.mode": "disabled"},
    )
    cp = run(launch_cmd(1) + overrides)
    assert cp.returncode == 3, cp.stderr[-2000:]
    assert "4 updates in a row skipped at step 4" in cp.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "the run diverged" in status["reason"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.iw_samples=0"], "config key 'loss.iw_samples' must be >= 1"),
        (["loss.iw_samples=4", "loss.free_bits=0.5"], "config key 'loss.free_bits' applies to the ELBO only"),
        (["loss.spectral_reg=-1"], "config key 'loss.spectral_reg' must be >= 0"),
        (["train.skip_threshold=-1"], "config key 'train.skip_threshold' must be >= 0"),
        (["train.max_consecutive_skips=0"], "config key 'train.max_consecutive_skips' must be >= 1"),
        (
            ["model.name=hvae", "model.latent_channels=2", "model.groups=[1]"],
            "config key 'model.groups' needs",
        ),
        (["model.name=hvae", "model.groups=[1,1]"], "config key 'model.latent_channels' must be >= 1"),
        (["model.name=resnet", "model.blocks=0"], "config key 'model.blocks' must be >= 1 for resnet"),
        (["model.name=resnet", "model.channels=[8,8,8,8,8,8,8,8]"], "needs 1 to 7 stages for resnet"),
        (["model.name=vqvae"], "model.name"),
    ],
)
def test_bad_model_keys_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_images_too_small_for_the_stages_is_a_config_error() -> None:
    cfg = load_config(None, ["model.name=resnet", "model.channels=[8,8,8,8,8]"])
    with pytest.raises(ConfigError, match="model.channels has 5 stages of resnet but the images are 8x8"):
        build_model(cfg.model, cfg.loss, (1, 8, 8))


def test_bad_hvae_key_on_the_command_line_is_one_line_exit_2(tiny_shards: str, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_shards, tmp_path / "run", **{**HVAE, "model.groups": "[2]"})
    cp = run([sys.executable, str(REPO / "vaejob" / "train.py"), *overrides], timeout=60)
    assert cp.returncode == 2
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaejob.train: error: config key 'model.groups'"), (
        cp.stderr
    )
    assert not (tmp_path / "run").exists()


CONFIGS = {
    "fashion_mnist_resnet.yaml": ("resnet", (1, 28, 28)),
    "fashion_mnist_hvae.yaml": ("hvae", (1, 28, 28)),
    "cifar10_hvae.yaml": ("hvae", (3, 32, 32)),
    "synthetic64_resnet.yaml": ("resnet", (3, 64, 64)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_load_and_build(name: str) -> None:
    family, shape = CONFIGS[name]
    cfg = load_config(str(REPO / "configs" / name), [])
    assert cfg.model.name == family and cfg.loss.likelihood == "discretized_logistic_mixture"
    model = build_model(cfg.model, cfg.loss, shape)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        out = model(x)
    assert out.params.shape[2:] == shape[1:] and torch.isfinite(out.kl).all()


def _pids_of(run_dir: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hvae", "resnet"])
def test_two_ranks_resume_exactly_after_sigusr1(family: str, tiny_shards: str, tmp_path: Path) -> None:
    from tests.test_train import start_and_wait

    kw = {
        **(HVAE if family == "hvae" else RESNET),
        "train.max_steps": 40,
        "train.checkpoint_every": 1000,
        "train.eval_every": 20,
        "train.sample_every": 20,
        "train.skip_threshold": 1e6,  # per-image nats: gradient norms here are ~1e4
        "train.lr": 3e-3,
        "loss.beta_warmup_steps": 20,
        "loss.likelihood": "discretized_logistic_mixture",
        "loss.mixtures": 2,
    }
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    cp = run(launch_cmd(2) + tiny_overrides(tiny_shards, straight, **kw))
    assert cp.returncode == 0, cp.stderr[-3000:]
    proc = start_and_wait(launch_cmd(2) + tiny_overrides(tiny_shards, preempted, **kw), preempted, 5)
    for pid in _pids_of(preempted):
        if pid != proc.pid:
            os.kill(pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    state = json.loads((preempted / "status.json").read_text())
    assert state["state"] == "preempted", err[-3000:]
    assert 10 <= state["step"] < 40
    cp = run(launch_cmd(2) + tiny_overrides(tiny_shards, preempted, **kw))
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "resumed from" in cp.stderr
    assert_same_run(straight, preempted)
    val, resumed = (
        [{k: v for k, v in r.items() if k != "time"} for r in metrics(d, "val")]
        for d in (straight, preempted)
    )
    assert len(val) == 2
    if family == "hvae":
        assert len(val[0]["kl_per_group"]) == 2 and len(val[0]["active_units_per_group"]) == 2
    assert resumed == val  # bit-identical validation metrics (but their wall-clock times)
