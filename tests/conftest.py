"""Shared fixtures: small real shard sets written by `vaejob.shard` (session-scoped, built once)."""

from __future__ import annotations

import os

import pytest

from vaejob.shard import main as shard_main

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def _shard(out: str, *args: str) -> str:
    code = shard_main([*args, "--out", out, "--workers", "1"])
    assert code == 0, f"vaejob.shard {' '.join(args)} exited {code}"
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a synthetic shard set: 300 images 16×16 RGB, shape labels (4) and factors.

    Val membership is a key hash with fraction 0.2 (about 60 images); 40 images per shard, so both splits have
    several shards (train-000000.tar ..., val-000000.tar ...). Read ``manifest.json`` for exact counts.
    """
    out = str(tmp_path_factory.mktemp("tiny_shards") / "synthetic")
    return _shard(
        out, "--source", "synthetic:300", "--size", "16", "--shard-size", "40", "--val-fraction", "0.2"
    )


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a real Fashion-MNIST subset: 600 images 28×28×1 with the 10 class names.

    ``--limit 600`` keeps both official splits in proportion (514 train, 86 val = official test images);
    100 images per shard. Skipped when the Debian ``dataset-fashion-mnist`` files are absent.
    """
    missing = [f for f in FASHION_MNIST_FILES if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, f))]
    if missing:
        pytest.skip(
            f"Fashion-MNIST not in {FASHION_MNIST_DIR} (missing {missing[0]}): apt-get install dataset-fashion-mnist"
        )
    out = str(tmp_path_factory.mktemp("fmnist_shards") / "fashion-mnist")
    return _shard(out, "--source", "fashion-mnist", "--limit", "600", "--shard-size", "100")
