"""Which sample goes into which split and shard: pure functions of the source's keys, the seed and the flags.

Split membership is a hash of the key alone (stable when you re-shard, add images or change the seed);
order within a split is a seeded hash (a deterministic shuffle that mixes class-sorted sources); shard ``i``
of a split holds its ordered samples ``[i*S, (i+1)*S)``. So the bytes never depend on ``--workers`` or the
job-array size.
"""

from __future__ import annotations

import hashlib

from vaejob.shards.format import shard_name
from vaejob.shards.sources import Source

SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.1

ShardTask = tuple[str, int, list[int]]  # (split, shard index, source sample indices)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def in_val(key: str, fraction: float) -> bool:
    """Split membership by key alone (no seed), so it is stable across re-shardings."""
    return _hash64(key) / 2**64 < fraction


def order_key(seed: int, key: str) -> bytes:
    """Sort key of a sample within its split: a seeded shuffle that mixes class-sorted sources."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def _limit(source: Source, limit: int | None) -> list[int]:
    n = len(source.keys)
    if limit is None or limit >= n:
        return list(range(n))
    if source.official is None:
        return list(range(limit))
    # Keep both official splits, in proportion, so a --limit subset still has a test split.
    by_split = {s: [i for i, o in enumerate(source.official) if o == s] for s in SPLITS}
    k_train = min(len(by_split["train"]), round(limit * len(by_split["train"]) / n))
    k_val = min(len(by_split["val"]), limit - k_train)
    return sorted(by_split["train"][:k_train] + by_split["val"][:k_val])


def plan_splits(
    source: Source, val_fraction: float | None, seed: int, limit: int | None
) -> dict[str, list[int]]:
    """Sample indices of each split, in shard order."""
    chosen = _limit(source, limit)
    if val_fraction is None and source.official is not None:
        splits = {s: [i for i in chosen if source.official[i] == s] for s in SPLITS}
    else:
        f = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        val = {i for i in chosen if in_val(source.keys[i], f)}
        splits = {"train": [i for i in chosen if i not in val], "val": [i for i in chosen if i in val]}
    for idx in splits.values():
        idx.sort(key=lambda i: order_key(seed, source.keys[i]))
    return splits


def plan_shards(splits: dict[str, list[int]], shard_size: int) -> list[ShardTask]:
    """All shard tasks ``(split, index, sample indices)``, train first; a task's ordinal is its position."""
    tasks = []
    for split in SPLITS:
        idx = splits[split]
        for k, start in enumerate(range(0, len(idx), shard_size)):
            tasks.append((split, k, idx[start : start + shard_size]))
    return tasks


def task_shard_names(tasks: list[ShardTask]) -> list[str]:
    return [shard_name(split, index) for split, index, _ in tasks]
