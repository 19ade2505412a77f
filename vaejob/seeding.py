"""Noise that belongs to one sample: a private CPU generator per ``(seed, item)``, so evaluation noise and
generated latents are the same whatever the batching, the number of processes or the device."""

from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, item: str | int) -> int:
    """A 63-bit seed of its own for ``item`` under ``seed`` (a hash, so nearby seeds and items do not collide)."""
    digest = hashlib.sha256(f"{seed}:{item}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def item_generator(seed: int, item: str | int) -> torch.Generator:
    """A private CPU generator seeded by ``(seed, item)``, ``item`` a sample key or a global index."""
    return torch.Generator(device="cpu").manual_seed(derived_seed(seed, item))
