"""What the loader yields (``Batch``) and the one way a uint8 batch becomes float images in [0, 1]."""

from __future__ import annotations

from typing import NotRequired, TypedDict

import numpy as np
from torch import Tensor


class Batch(TypedDict):
    image: Tensor  # (N, C, H, W) float32 in [0, 1], or uint8 0..255 with raw=True
    label: Tensor  # (N,) int64, -1 = no label
    valid: Tensor  # (N,) bool; False = val padding (zero image, label -1)
    key: NotRequired[list[str]]  # with_keys=True; "" for padding


def unit_float(images: Tensor) -> Tensor:
    """uint8 images (0..255) -> float32 in [0, 1]; float images pass through as float32. Bit-identical to
    ``np_unit_float``, so converting on the device or in the loader gives the same numbers."""
    return images.float() if images.dtype.is_floating_point else images.float().div_(255.0)


def np_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 / 255 on the host, bit-identical to ``unit_float``. numpy does it in one
    single-threaded pass into recycled heap memory; torch's two passes over fresh pages cost ~5x more
    here, mostly page faults and OpenMP spinning next to the busy workers."""
    return np.divide(images, np.float32(255), dtype=np.float32)
