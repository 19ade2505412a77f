"""The training job in real processes: DDP over gloo via `accelerate launch`, resume, signals, AMP, W&B files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.util import (
    REPO,
    assert_same_run,
    cpu_env,
    launch_cmd,
    metrics,
    run,
    tiny_overrides,
    wandb_history,
    wandb_records,
    wandb_runs,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(make_shards) -> str:
    """600 synthetic 16x16 RGB images with shape labels: big enough to learn, small enough for seconds."""
    return make_shards("--source", "synthetic:600", "--size", "16", "--shard-size", "100")


def train(
    shards: str, run_dir: Path, nproc: int = 1, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    cp = run(launch_cmd(nproc) + tiny_overrides(shards, run_dir, **kw), env=env)
    return cp


def steps(run_dir: Path, split: str = "train") -> list[int]:
    return [r["step"] for r in metrics(run_dir, split)]


PROBE = """
import json, sys, torch
from vaejob.config import load_config
from vaejob.train import Trainer
trainer = Trainer(load_config(None, sys.argv[2:]))
code = trainer.fit()
params = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
out = {"rank": trainer.rank, "world": trainer.world, "code": code, "params": params.double().tolist()[:4000],
       "batches": len(trainer.train_loader)}
json.dump(out, open(sys.argv[1] + f"/rank{trainer.rank}.json", "w"))
"""


def test_ddp_two_ranks_identical_weights_and_learning(shards, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run_dir = tmp_path / "run"
    cmd = (
        launch_cmd(2, str(probe))
        + [str(tmp_path)]
        + tiny_overrides(shards, run_dir, **{"train.max_steps": 40})
    )
    cp = run(cmd)
    assert cp.returncode == 0, cp.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (
        r0["world"] == r1["world"] == 2
    )  # the ENVIRONMENT.md trap: two processes that each think they are alone
    assert {r0["rank"], r1["rank"]} == {0, 1}
    assert r0["batches"] == r1["batches"]
    assert np.array_equal(r0["params"], r1["params"])  # DDP kept the replicas identical
    train_losses = [r["loss"] for r in metrics(run_dir, "train")]
    assert np.mean(train_losses[-3:]) < 0.9 * np.mean(train_losses[:3])  # it learns
    assert steps(run_dir) == list(range(2, 41, 2))
    val = metrics(run_dir, "val")
    assert [v["step"] for v in val] == [10, 20, 30, 40]
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    assert all(v["count"] == manifest["splits"]["val"]["count"] for v in val)  # every val image once
    assert all(abs(v["nelbo"] - (v["recon"] + v["kl"])) < 1e-6 for v in val)
    # checkpoints: kept the last 3, each complete with both ranks' RNG states and safetensors weights
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    assert ckpts == ["step_00000020", "step_00000030", "step_00000040"]
    files = set(os.listdir(run_dir / "checkpoints" / "step_00000040"))
    assert {"model.safetensors", "trainer_state.json", "random_states_0.pkl", "random_states_1.pkl"} <= files
    weights = load_file(str(run_dir / "checkpoints" / "step_00000040" / "model.safetensors"))
    flat = torch.cat([weights[k].flatten() for k in weights])
    assert flat.numel() >= 4000 or np.allclose(sorted(flat.tolist()), sorted(r0["params"]))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"


def test_resume_after_crash_matches_straight_run(shards, tmp_path):
    kw = {"train.max_steps": 30, "data.num_workers": 2}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert train(shards, straight, **kw).returncode == 0
    # A run killed hard (SIGKILL, no chance to clean up) once its step-10 checkpoint exists.
    proc = subprocess.Popen(
        launch_cmd(1) + tiny_overrides(shards, crashed, **kw, **{"train.checkpoint_every": 10}),
        env=cpu_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    # Killed once it has logged past the step-10 checkpoint: the resumed job logs those steps again.
    while (
        not (crashed / "checkpoints" / "step_00000010" / "trainer_state.json").exists()
        or max(steps(crashed), default=0) < 14
    ):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    resumed_at = int(sorted((crashed / "checkpoints").glob("step_*"))[-1].name.split("_")[1])
    cp = train(shards, crashed, **kw, **{"run.resume": "auto"})
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert f"at step {resumed_at}" in cp.stderr
    assert_same_run(straight, crashed)
    # one W&B run id across the crash, in two offline run dirs (one per process lifetime)
    runs = wandb_runs(crashed)
    assert len(runs) == 2 and len({r.rsplit("-", 1)[1] for r in runs}) == 1
    # W&B holds every row each segment got written, in order: the killed job's unwritten rows are lost there
    # (offline, wandb writes its log in 32 KiB blocks), the resumed job logs them again from metrics.jsonl, and
    # it logs the steps after its checkpoint again. For each trainer/step the row logged last is metrics.jsonl's.
    last: dict[tuple[int, str], Any] = {}
    for row in [row for r in runs for row in wandb_history(r)]:
        last.update({(row["trainer/step"], k): v for k, v in row.items() if k.startswith(("train/", "val/"))})
    kept = {
        (r["step"], f"{r['split']}/{k}"): v
        for r in metrics(crashed)
        for k, v in r.items()
        if k not in ("step", "split")
    }
    assert sorted(last) == sorted(kept)
    assert all(last[k] == pytest.approx(v) for k, v in kept.items()), [
        k for k, v in kept.items() if last[k] != v
    ]


def start_and_wait(cmd: list[str], run_dir: Path, min_logged: int) -> subprocess.Popen:
    """Start the job in its own session and return once it has logged ``min_logged`` train events."""
    proc = subprocess.Popen(
        cmd,
        env=cpu_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(steps(run_dir)) < min_logged:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


def test_sigusr1_checkpoints_and_exits_75_then_resumes_exactly_two_ranks(shards, tmp_path):
    kw = {
        "train.max_steps": 40,
        "train.checkpoint_every": 1000,
        "train.eval_every": 20,
        "train.sample_every": 20,
    }
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    cp = train(shards, straight, nproc=2, **kw)
    assert cp.returncode == 0, cp.stderr[-3000:]
    proc = start_and_wait(launch_cmd(2) + tiny_overrides(shards, preempted, **kw), preempted, 5)
    # What SLURM does before preemption: signal the training processes (both ranks here; one rank is enough).
    workers = subprocess.run(
        ["pgrep", "-f", f"run.dir={preempted}"], capture_output=True, text=True
    ).stdout.split()
    for pid in workers:
        if int(pid) != proc.pid:
            os.kill(int(pid), signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    state = json.loads((preempted / "status.json").read_text())
    assert state["state"] == "preempted", err[-3000:]
    stopped_at = state["step"]
    assert 10 <= stopped_at < 40
    assert (preempted / "checkpoints" / f"step_{stopped_at:08d}" / "trainer_state.json").exists()
    assert "exiting 75" in err
    cp = train(shards, preempted, nproc=2, **kw)  # run.resume=auto is the default
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert_same_run(straight, preempted)


def test_sigterm_to_every_process_checkpoints_and_exits_75(shards, tmp_path):
    """Slurm's SIGTERM reaches every process of the step: loader workers and W&B's service too."""
    run_dir = tmp_path / "run"
    overrides = {"train.max_steps": 100000, "train.checkpoint_every": 1000, "data.num_workers": 2}
    proc = start_and_wait(launch_cmd(1) + tiny_overrides(shards, run_dir, **overrides), run_dir, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-3000:]
    step = json.loads((run_dir / "status.json").read_text())["step"]
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").exists()
    assert steps(run_dir)[-1] <= step


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_are_finite(shards, tmp_path, precision):
    run_dir = tmp_path / precision
    cp = train(
        shards,
        run_dir,
        **{"train.mixed_precision": precision, "train.max_steps": 10, "wandb.mode": "disabled"},
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    records = metrics(run_dir)
    assert records and all(np.isfinite(r["loss"]) for r in records)
    assert not (run_dir / "wandb").exists()  # disabled writes nothing


def test_outputs_samples_plots_and_wandb_files(shards, tmp_path):
    run_dir = tmp_path / "run"
    secret = "vaejob-test-secret-0123456789abcdef"
    env = cpu_env(WANDB_API_KEY=secret)
    cp = run(launch_cmd(1) + tiny_overrides(shards, run_dir, **{"wandb.tags": "[unit]"}), env=env)
    assert cp.returncode == 0, cp.stderr[-3000:]
    summary = json.loads(cp.stdout.strip().splitlines()[-1])
    assert summary["step"] == 20
    for step in (10, 20):
        d = run_dir / "samples" / f"step_{step:08d}"
        arr = np.load(d / "samples.npy")
        assert arr.shape == (16, 16, 16, 3) and arr.dtype == np.uint8
        assert Image.open(d / "samples.png").size[0] > 16 * 3
        assert Image.open(d / "recon.png").size[1] > 16
        assert json.loads((d / "meta.json").read_text())["step"] == step
    # fixed seed: the same z every time, so step grids differ only because the model changed
    assert not np.array_equal(
        np.load(run_dir / "samples" / "step_00000010" / "samples.npy"),
        np.load(run_dir / "samples" / "step_00000020" / "samples.npy"),
    )
    for name in ("loss_curves", "latent_scatter", "interpolation"):
        assert Image.open(run_dir / "plots" / f"{name}.png").size[0] > 100
    cfg_dump = (run_dir / "config.yaml").read_text()
    assert "batch_size: 8" in cfg_dump

    (offline,) = wandb_runs(run_dir)
    records = wandb_records(offline)
    run_rec = next(r for r in records if r["type"] == "run")["run"]
    assert run_rec["run_id"] == (run_dir / "wandb_id.txt").read_text().strip()
    assert "unit" in json.dumps(run_rec.get("tags", []))
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    train_steps = [h["trainer/step"] for h in history if "train/loss" in h]
    assert train_steps == steps(run_dir)
    logged = {h["trainer/step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert logged == {r["step"]: pytest.approx(r["loss"]) for r in metrics(run_dir, "train")}
    assert any("val/nelbo" in h for h in history)
    image_keys = {k.split(".")[0] for h in history for k in h if k.endswith("._type")}
    assert {"images/samples", "images/recon", "images/loss_curves", "images/latent_scatter"} <= image_keys
    images = list(Path(offline).glob("files/media/images/**/*.png"))
    assert len(images) >= 4
    # the API key never reaches the run dir: config dump, metrics, W&B files, logs
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in cp.stdout + cp.stderr


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    cp = train(
        shards,
        run_dir,
        **{
            "train.lr": 1e30,
            "train.warmup_steps": 0,
            "train.log_every": 1,
            "train.checkpoint_every": 1,
            "train.max_steps": 50,
            "wandb.mode": "disabled",
        },
    )
    assert cp.returncode == 3, cp.stderr[-2000:]
    assert "non-finite loss at step" in cp.stderr
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    bad_step = int(cp.stderr.split("non-finite loss at step ")[1].split(";")[0])
    assert ckpts and int(ckpts[-1].split("_")[1]) < bad_step
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.bach_size=4"], "unknown config key 'train.bach_size' (did you mean 'train.batch_size'?)"),
        (["train.lr=fast"], "config key 'train.lr' must be a number"),
        (["train.mixed_precision=fp8"], "use one of no|bf16|fp16"),
        (["train.max_steps=0"], "config key 'train.max_steps' must be > 0"),
        (["--config", "configs/nope.yaml"], "config file 'configs/nope.yaml' not found"),
        (["data.shards=/nonexistent/shards"], "/nonexistent/shards"),
    ],
)
def test_bad_config_one_line_exit_2(shards, tmp_path, args, message):
    overrides = [
        a
        for a in tiny_overrides(shards, tmp_path / "run")
        if a.split("=")[0] not in {x.split("=")[0] for x in args}
    ]
    cp = run([sys.executable, str(REPO / "vaejob" / "train.py"), *overrides, *args], timeout=60)
    assert cp.returncode == 2
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaejob.train: error:") and message in lines[0], cp.stderr
    assert not (tmp_path / "run").exists()


def test_bare_no_is_the_no_precision_choice(tmp_path):
    """YAML 1.1 reads a bare ``no`` as False: both spellings users type must still mean mixed_precision "no"."""
    from vaejob.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(path)).train.mixed_precision == "no"
    cfg = load_config(
        "configs/fashion_mnist.yaml", ["train.mixed_precision=bf16", "train.mixed_precision=no"]
    )
    assert cfg.train.mixed_precision == "no"


def test_resume_never_refuses_to_clobber(shards, tmp_path):
    run_dir = tmp_path / "run"
    assert train(shards, run_dir, **{"train.max_steps": 10, "wandb.mode": "disabled"}).returncode == 0
    cp = train(shards, run_dir, **{"run.resume": "never", "wandb.mode": "disabled"})
    assert cp.returncode == 2
    assert "run.resume=never" in cp.stderr and "already holds checkpoints" in cp.stderr
