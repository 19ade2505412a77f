"""Shared test helpers: running the real job in real processes, reading shard sets and loaders back."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from vaejob.loader import ShardLoader, make_loader
from vaejob.shard import main as shard_main

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "vaejob" / "train.py")
BIN = Path(sys.executable).parent

# The deeper families at test size (16 to 64 px): test_models builds them, test_cuda trains them.
TINY_FAMILIES = {
    "resnet": [
        "model.name=resnet",
        "model.channels=[8,16]",
        "model.attention=true",
        "model.latent_channels=2",
    ],
    "resnet_dense": ["model.name=resnet", "model.channels=[8,16]", "model.latent_dim=6"],
    "hvae": [
        "model.name=hvae",
        "model.channels=[8,16]",
        "model.groups=[1,2]",
        "model.latent_channels=2",
        "model.blocks=1",
    ],
}


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


def device_env(device: str, **extra: str) -> dict[str, str]:
    """``cpu_env`` for ``device="cpu"``; for ``"cuda"`` the same without ACCELERATE_USE_CPU, so the job trains on
    the GPU (one process: ``cuda:0``)."""
    env = cpu_env(**extra)
    if device != "cpu":
        env.pop("ACCELERATE_USE_CPU")
    return env


def launch_cmd(nproc: int, script: str = TRAIN, accelerate: bool = False) -> list[str]:
    """``python SCRIPT`` for one process (unless ``accelerate``), else ``accelerate launch ... SCRIPT``."""
    if nproc == 1 and not accelerate:
        return [sys.executable, script]
    return [
        str(BIN / "accelerate"),
        "launch",
        *(["--multi_gpu"] if nproc > 1 else []),
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


def module_cmd(module: str, nproc: int) -> list[str]:
    """`python -m vaejob.X` or `accelerate launch ... -m vaejob.X`."""
    if nproc == 1:
        return [sys.executable, "-m", module]
    return [*launch_cmd(nproc, "-m"), module]  # accelerate launch's -m: the "script" is a module


def tiny_overrides(shards: str, run_dir: str | Path, **kw: Any) -> list[str]:
    """A config small enough for a few seconds of CPU: tiny conv VAE, tiny batches, frequent events."""
    base = {
        "data.shards": shards,
        "data.num_workers": 1,
        "train.mixed_precision": "no",  # not auto: the same numerics on every CI machine (tests/test_device.py)
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


def evaluate_json(run_dir: str | Path, nproc: int, *args: str) -> dict[str, Any]:
    """``vaejob.evaluate --run RUN_DIR ARGS`` on ``nproc`` processes: the record it prints."""
    cp = run(module_cmd("vaejob.evaluate", nproc) + ["--run", str(run_dir), *args])
    assert cp.returncode == 0, cp.stderr[-3000:]
    return json.loads(cp.stdout)


def final_params(run_dir: str | Path) -> dict[str, Any]:
    """The weights of a run's newest checkpoint."""
    ckpts = sorted((Path(run_dir) / "checkpoints").iterdir())
    return load_file(str(ckpts[-1] / "model.safetensors"))


def assert_same_run(a: str | Path, b: str | Path) -> None:
    """Two runs trained alike: the same final weights, the same metrics.jsonl events and losses."""
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    ma, mb = metrics(a), metrics(b)
    assert [(r["step"], r["split"]) for r in ma] == [(r["step"], r["split"]) for r in mb]  # no gap, no repeat
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4), ra["step"]


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


def wandb_history(offline_run: str) -> list[dict[str, Any]]:
    """The rows an offline W&B run logged (``run.log`` payloads), in the order it logged them."""
    return [r["history"]["item"] for r in wandb_records(offline_run) if r["type"] == "history"]


def write_shard_set(*args: str, out: str | Path, workers: int = 1) -> str:
    """Run ``vaejob.shard ARGS --out OUT`` in-process (the one way tests write a shard set); returns OUT."""
    code = shard_main([*args, "--out", str(out), "--workers", str(workers)])
    assert code == 0, f"vaejob.shard {' '.join(args)} exited {code}"
    return str(out)


def manifest(root: str | Path) -> dict[str, Any]:
    return json.loads((Path(root) / "manifest.json").read_text())


def urls(root: str | Path, split: str) -> list[str]:
    return [str(Path(root) / s["name"]) for s in manifest(root)["splits"][split]["shards"]]


def reference(root: str | Path) -> dict[str, tuple[np.ndarray, int]]:
    """Every sample as plain webdataset decodes it: key -> (H, W, C uint8, label)."""
    out = {}
    for s in wds.WebDataset(urls(root, "train") + urls(root, "val"), shardshuffle=False).decode("rgb8"):
        image = s.get("npy", s.get("png"))
        out[s["__key__"]] = (np.asarray(image).reshape(*np.asarray(image).shape[:2], -1), int(s["cls"]))
    return out


def shard_keys(root: str | Path, split: str) -> dict[str, str]:
    """key -> shard name."""
    out = {}
    for url in urls(root, split):
        with tarfile.open(url) as tar:
            out.update({m.name.split(".")[0]: Path(url).name for m in tar.getmembers()})
    return out


def loader(root: str, split: str = "train", batch_size: int = 8, **kw: Any) -> ShardLoader:
    """A single-process-group loader (rank 0 of 1) that reports sample keys, unless told otherwise."""
    return make_loader(root, split, batch_size, **{"rank": 0, "world_size": 1, "with_keys": True, **kw})


def keys_of(loader: Any, limit: int | None = None) -> list[list[str]]:
    """The valid keys of each batch the loader yields (all of the epoch, or the first ``limit``)."""
    out = []
    for batch in loader:
        out.append([k for k, v in zip(batch["key"], batch["valid"].tolist(), strict=True) if v])
        if len(out) == limit:
            break
    return out


def flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


def one_line_error(excinfo: Any, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
