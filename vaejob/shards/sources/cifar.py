"""CIFAR-10's official python batches: ``cifar10:DIR``. They are pickles: only open files you trust."""

from __future__ import annotations

import os
import pickle

import numpy as np

from vaejob.shards.sources.base import Loaded, Source, SourceError, label_array

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Cifar10(Source):
    """The official python batches. They are pickles: only open files from a source you trust."""

    name = "cifar10"
    native_size = 32
    native_channels = 3

    def __init__(self, root: str) -> None:
        self.scan_skipped = []
        nested = os.path.join(root, "cifar-10-batches-py")
        folder = nested if os.path.isdir(nested) else root
        if not os.path.isdir(folder):
            raise SourceError(
                f"cifar10: {root!r} is not a directory: pass cifar10:DIR (cifar-10-batches-py or its parent), or --download"
            )
        images, labels, keys, official = [], [], [], []
        batches = [(f"data_batch_{k}", "train") for k in range(1, 6)] + [("test_batch", "val")]
        counters = {"train": 0, "val": 0}
        for fname, split in batches:
            data, labs = self._read_batch(os.path.join(folder, fname))
            prefix = "train" if split == "train" else "test"
            keys += [f"{prefix}-{counters[split] + k:05d}" for k in range(len(data))]
            counters[split] += len(data)
            official += [split] * len(data)
            # Rows are 1024 red, 1024 green, 1024 blue values (CHW): make them HWC.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(labs)
        self.images = np.ascontiguousarray(np.concatenate(images))
        self.labels = np.concatenate(labels)
        self.keys = keys
        self.official = official
        self.label_names = self._read_names(os.path.join(folder, "batches.meta"))

    @staticmethod
    def _unpickle(path: str) -> dict:
        if not os.path.isfile(path):
            raise SourceError(
                f"cifar10: missing {path!r}: pass cifar10:DIR with the python batches (cifar-10-python.tar.gz), or --download"
            )
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f, encoding="bytes")
        except Exception as e:
            raise SourceError(
                f"cifar10: {path!r} is not a CIFAR python batch ({type(e).__name__}): re-download it"
            ) from None
        if not isinstance(obj, dict):
            raise SourceError(
                f"cifar10: {path!r} is not a CIFAR python batch (no dict inside): re-download it"
            )
        return obj

    def _read_batch(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        obj = self._unpickle(path)
        data, labels = obj.get(b"data"), obj.get(b"labels")
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
        ):
            raise SourceError(f"cifar10: {path!r} has no uint8 N×3072 'data' array: re-download it")
        labs = label_array(
            np.asarray(labels if labels is not None else [], dtype=np.int64), len(data), f"cifar10: {path}"
        )
        return data, labs

    def _read_names(self, path: str) -> list[str]:
        names = self._unpickle(path).get(b"label_names")
        if not isinstance(names, list) or len(names) != 10:
            return list(CIFAR10_NAMES)
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]

    def load(self, i: int) -> Loaded:
        return self.images[i], int(self.labels[i]), None
