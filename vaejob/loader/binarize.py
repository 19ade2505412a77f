"""Binarised images (``data.binarize``): each pixel of a uint8 image becomes 255 with probability x / 255, else
0, one Bernoulli(x) draw per pixel, so that a Bernoulli decoder's nats are a normalised likelihood, comparable
with binarised-MNIST results:

- ``static``: one fixed draw per image, salted by its sample key alone: the same images every epoch, every
  run and every evaluation;
- ``dynamic``: a fresh draw every epoch, salted by (train.seed, epoch, sample key). Keyed by sample, not by
  (step, rank): the draw of an image does not depend on the world size, batch size or worker count, and a
  resumed job redraws exactly what an uninterrupted one drew (the loader's state holds seed and epoch).

Evaluation of a binarised run (training's val pass, ``vaejob.evaluate``) reads the static draw, so numbers
are comparable across runs and with each other.

Each pixel's uniform is 24 bits of a keyed integer hash of its index (three rounds of Chris Wellons'
lowbias32, keyed by 64 bits of sha256(salt:key)): P(255) = ceil(x * 2^24 / 255) / 2^24, within 6e-8 of x / 255.
Integer arithmetic only, so the CPU and a GPU draw the same bits; it runs where the batch is (the trainer's
device), so the batch still crosses to the GPU as uint8, and costs a few elementwise kernels there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Binarize = Literal["none", "static", "dynamic"]
MASK = 0xFFFFFFFF
# lowbias32's multipliers: both < 2**31, so x * m for x < 2**32 stays below 2**63 in int64 (no overflow).
M1, M2 = 0x21F0AAAD, 0x735A2D97


def eval_binarize(train: Binarize) -> Binarize:
    """What evaluation of a run trained with ``train`` reads: the fixed draw of a binarised run."""
    return "none" if train == "none" else "static"


def salt(mode: Binarize, seed: int, epoch: int) -> str:
    return "static" if mode == "static" else f"dynamic:{seed}:{epoch}"


def key_seeds(salt: str, keys: Sequence[str]) -> Tensor:
    """(N, 2) int64: two 32-bit words of sha256(``salt:key``) per key."""
    words = [int.from_bytes(hashlib.sha256(f"{salt}:{k}".encode()).digest()[:8], "big") for k in keys]
    return torch.tensor([[w >> 32, w & MASK] for w in words], dtype=torch.int64)


def _mix(x: Tensor) -> Tensor:
    """lowbias32 in place on int64 values < 2**32: a bijection of 32-bit words with strong avalanche."""
    x ^= x >> 16
    x.mul_(M1).bitwise_and_(MASK)
    x ^= x >> 15
    x.mul_(M2).bitwise_and_(MASK)
    x ^= x >> 15
    return x


def bernoulli_draw(images: Tensor, seeds: Tensor) -> Tensor:
    """uint8 images (N, ...) -> uint8 0 / 255 on their device: pixel i of image n is 255 with probability
    x / 255, drawn from (``seeds[n]``, i) alone."""
    n, device = len(images), images.device
    a, b = seeds.to(device).split(1, dim=1)  # (N, 1) each
    x = images.reshape(n, -1)
    h = torch.arange(x.shape[1], dtype=torch.int64, device=device).expand(n, -1) ^ a
    h = _mix(_mix(_mix(h) ^ b) ^ a)
    ones = (h >> 8).mul_(255) < x.to(torch.int64) << 24  # u < x / 255 with u = (h >> 8) / 2**24
    return ones.to(torch.uint8).mul_(255).view(images.shape)
