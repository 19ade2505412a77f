"""MNIST-format IDX files: ``mnist[:DIR]``, ``fashion-mnist[:DIR]`` (both official splits)."""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np

from vaejob.shards.sources.base import Loaded, Source, SourceError, label_array

FASHION_MNIST_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_NAMES = [str(d) for d in range(10)]


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX ubyte file (optionally gzipped) with ``ndim`` dimensions, validating magic and size."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot read ({e}): re-download the file") from None
    head = 4 + 4 * ndim
    if len(data) < head or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise SourceError(
            f"{path}: not an IDX{ndim} ubyte file (magic {data[:4].hex() or 'missing'}, "
            f"expected 0000080{ndim}): re-download the file"
        )
    dims = struct.unpack(f">{ndim}I", data[4:head])
    if len(data) - head != math.prod(dims):
        raise SourceError(
            f"{path}: header says shape {dims} ({math.prod(dims)} bytes) but holds {len(data) - head}: "
            "the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


class IdxSource(Source):
    """MNIST-format datasets: both official splits, train first (keys ``train-NNNNN``, ``test-NNNNN``)."""

    native_channels = 1
    FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(self, name: str, root: str, label_names: list[str], tv_dirname: str) -> None:
        self.name = name
        self.label_names = label_names
        self.scan_skipped = []
        if not os.path.isdir(root):
            raise SourceError(
                f"{name}: {root!r} is not a directory: pass {name}:DIR with the IDX files, or --download"
            )
        # Also accept a torchvision root (ROOT/FashionMNIST/raw/...).
        dirs = [root, os.path.join(root, tv_dirname, "raw")]
        images, labels, official, keys = [], [], [], []
        for split, (img_name, lab_name) in self.FILES.items():
            img_path, lab_path = (self._find(dirs, n) for n in (img_name, lab_name))
            imgs = read_idx(img_path, 3)
            labs = label_array(read_idx(lab_path, 1), len(imgs), f"{name}: {lab_path}")
            prefix = "train" if split == "train" else "test"
            images.append(imgs)
            labels.append(labs)
            official += [split] * len(imgs)
            keys += [f"{prefix}-{k:05d}" for k in range(len(imgs))]
        shapes = {im.shape[1:] for im in images}
        if len(shapes) != 1:
            raise SourceError(
                f"{name}: train and test images differ in size {sorted(shapes)}: mixed datasets in {root!r}"
            )
        self.images = np.concatenate(images)
        self.labels = np.concatenate(labels)
        self.official = official
        self.keys = keys
        self.native_size = int(self.images.shape[1])

    def _find(self, dirs: list[str], base: str) -> str:
        for d in dirs:
            for candidate in (base, base + ".gz"):
                path = os.path.join(d, candidate)
                if os.path.isfile(path):
                    return path
        raise SourceError(
            f"{self.name}: missing {base}[.gz] in {dirs[0]!r}: pass {self.name}:DIR with the IDX files, or --download"
        )

    def load(self, i: int) -> Loaded:
        return self.images[i][..., None], int(self.labels[i]), None
