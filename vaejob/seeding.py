"""Noise that belongs to one sample: a private CPU generator per ``(seed, item)``, so evaluation noise and
generated latents are the same whatever the batching, the number of processes or the device."""

from __future__ import annotations

import hashlib

import torch


def item_generator(seed: int, item: str | int) -> torch.Generator:
    """A private CPU generator seeded by ``(seed, item)``, ``item`` a sample key or a global index."""
    digest = hashlib.sha256(f"{seed}:{item}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "big") >> 1)
