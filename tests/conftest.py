"""Shared fixtures: real shard sets written by `vaejob.shard` (one factory, session-cached) and a tiny run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.util import launch_cmd, run, tiny_overrides, write_shard_set

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]

MakeShards = Callable[..., str]


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory: pytest.TempPathFactory) -> MakeShards:
    """``make_shards(*vaejob.shard args, out=None, workers=1) -> dir``: writes a real shard set in-process.

    Without ``out`` the set goes to a fresh temp dir and is cached by its arguments for the whole session
    (tests must not modify it: copy it first); with ``out`` it is written there every time.
    """
    cache: dict[tuple, str] = {}

    def make(*args: str, out: str | Path | None = None, workers: int = 1) -> str:
        key = (args, workers)
        if out is None and key in cache:
            return cache[key]
        target = write_shard_set(*args, out=out or tmp_path_factory.mktemp("shards") / "set", workers=workers)
        if out is None:
            cache[key] = target
        return target

    return make


@pytest.fixture(scope="session")
def tiny_shards(make_shards: MakeShards) -> str:
    """A synthetic shard set: 300 images 16×16 RGB, shape labels (4) and factors.

    Val membership is a key hash with fraction 0.2 (about 60 images); 40 images per shard, so both splits have
    several shards (train-000000.tar ..., val-000000.tar ...). Read ``manifest.json`` for exact counts.
    """
    return make_shards(
        "--source", "synthetic:300", "--size", "16", "--shard-size", "40", "--val-fraction", "0.2"
    )


@pytest.fixture(scope="session")
def fmnist_shards(make_shards: MakeShards) -> str:
    """A real Fashion-MNIST subset: 600 images 28×28×1 with the 10 class names.

    ``--limit 600`` keeps both official splits in proportion (514 train, 86 val = official test images);
    100 images per shard. Skipped when the Debian ``dataset-fashion-mnist`` files are absent.
    """
    missing = [f for f in FASHION_MNIST_FILES if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, f))]
    if missing:
        pytest.skip(
            f"Fashion-MNIST not in {FASHION_MNIST_DIR} (missing {missing[0]}): apt-get install dataset-fashion-mnist"
        )
    return make_shards("--source", "fashion-mnist", "--limit", "600", "--shard-size", "100")


@pytest.fixture(scope="session")
def tiny_run(tiny_shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conv VAE trained for 60 steps on the 16x16 synthetic shards; one checkpoint at step 60."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    every = {f"train.{k}_every": 60 for k in ("eval", "checkpoint", "sample")}
    overrides = tiny_overrides(
        tiny_shards, run_dir, **{"train.max_steps": 60, "samples.final_plots": "false", **every}
    )
    cp = run(launch_cmd(1) + overrides)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return run_dir
