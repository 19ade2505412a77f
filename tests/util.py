"""Shared helpers for tests that run the real job in real processes."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "vaejob" / "train.py")
BIN = Path(sys.executable).parent


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for CPU multi-process runs (ENVIRONMENT.md: without ACCELERATE_USE_CPU=1 the two
    --multi_gpu processes would each think they are alone)."""
    env = dict(os.environ)
    env.update(
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def launch_cmd(nproc: int, script: str = TRAIN) -> list[str]:
    if nproc == 1:
        return [sys.executable, script]
    return [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        script,
    ]


def tiny_overrides(shards: str, run_dir: str | Path, **kw: Any) -> list[str]:
    """A config small enough for a few seconds of CPU: tiny conv VAE, tiny batches, frequent events."""
    base = {
        "data.shards": shards,
        "data.num_workers": 1,
        "run.dir": str(run_dir),
        "model.channels": "[8,16]",
        "model.latent_dim": 4,
        "train.batch_size": 8,
        "train.max_steps": 20,
        "train.warmup_steps": 2,
        "train.lr": 0.01,
        "train.log_every": 2,
        "train.eval_every": 10,
        "train.checkpoint_every": 10,
        "train.sample_every": 10,
        "train.progress": "false",
        "samples.num": 16,
        "samples.recon": 8,
        "wandb.mode": "offline",
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def wandb_runs(run_dir: str | Path) -> list[str]:
    return sorted(glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*")))


def wandb_records(offline_run: str) -> list[dict[str, Any]]:
    """Read a real offline W&B run back with W&B's own reader (`wandb leet inspect --json`)."""
    out = subprocess.run(
        [str(BIN / "wandb"), "leet", "inspect", "--json", offline_run],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
