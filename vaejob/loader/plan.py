"""Epoch planning as pure functions: which samples each rank and worker reads, in which order.

A split is a list of shards whose sample counts are known from the manifest. Each epoch the shards are put
in an order (train: a permutation drawn from ``(seed, epoch)``; val: manifest order) and concatenated into
one global sample stream.

- Train: every rank gets the same quota ``Q = floor(N / (world * B)) * B`` samples, a contiguous slice of
  the stream (the global remainder is dropped). Slices may cut shards mid-way, so any number of shards
  works with any number of ranks and workers, and every rank yields exactly ``Q / B`` batches (unequal
  batch counts hang DDP).
- Val (any split but ``train``): every rank gets a contiguous ``ceil(N / world)`` slice, padded to whole
  batches with ``valid=False`` samples: every sample is counted exactly once across ranks, and all ranks
  yield the same number of batches.
- Within a rank the slice is split among ``S = max(1, num_workers)`` streams in whole batches: stream ``w``
  owns a contiguous block of the slice, reads its segments (shard, first sample, last sample) in order and
  shuffles through a buffer seeded by ``(seed, epoch, rank, w)`` (train only). The consumer receives
  batches round-robin across streams, so batch ``k`` of the epoch is batch ``k // S`` of stream ``k % S``:
  the whole epoch is a pure function of
  ``(manifest, seed, epoch, rank, world_size, batch_size, num_workers, shuffle_buffer)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from vaejob.shards.format import SplitShards

# (shard url, first sample, stop sample, samples in the tar, picked tar positions or None); with picks the
# first / stop sample index into them (an indexed shard shared by splits, see format.SplitShards)
Segment = tuple[str, int, int, int, tuple[int, ...] | None]


@dataclass(frozen=True)
class Stream:
    """What one worker reads and yields this epoch."""

    segments: tuple[Segment, ...]
    pad: int  # padding samples after the real ones (val)
    batches: int  # batches still to yield
    skip: int  # batches to fast-forward (shuffled streams only; unshuffled ones start at the offset)
    seed: int | None  # shuffle seed, None = no shuffle


def stream_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint64)
    return int(state[0]) ^ (int(state[1]) << 1)


def _segments(split: SplitShards, order: list[int], lo: int, hi: int) -> tuple[Segment, ...]:
    out, offset = [], 0
    for i in order:
        c = split.counts[i]
        a, b = max(lo, offset), min(hi, offset + c)
        if a < b:
            out.append((split.urls[i], a - offset, b - offset, split.total(i), split.pick(i)))
        offset += c
    return tuple(out)


def plan_epoch(
    split: SplitShards,
    *,
    train: bool,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    batch_size: int,
    streams: int,
    start: int,
) -> list[Stream]:
    """Streams indexed by DataLoader worker id, for the batches from ``start`` on."""
    order = list(range(len(split.urls)))
    if train:
        random.Random(stream_seed(seed, epoch)).shuffle(order)
    nb = num_batches(split.count, train, world, batch_size)
    if train:
        lo = rank * nb * batch_size
        real_hi = lo + nb * batch_size
    else:
        per = math.ceil(split.count / world)
        lo = min(split.count, rank * per)
        real_hi = min(split.count, lo + per)
    q, r = divmod(nb, streams)
    roles = []
    for w in range(streams):
        first = (w * q + min(w, r)) * batch_size + lo
        last = first + (q + (w < r)) * batch_size
        done = max(0, -(-(start - w) // streams))  # batches k < start with k % streams == w
        todo = q + (w < r) - min(done, q + (w < r))
        if train:
            seed_w = stream_seed(seed, epoch, rank, w)
            segs = _segments(split, order, first, min(last, real_hi))
            roles.append(Stream(segs, 0, todo, done, seed_w))
        else:  # no shuffle: start reading at the first unconsumed sample
            begin = min(first + done * batch_size, last)
            segs = _segments(split, order, min(begin, real_hi), min(last, real_hi))
            pad = (last - begin) - max(0, min(last, real_hi) - min(begin, real_hi))
            roles.append(Stream(segs, pad, todo, 0, None))
    # The DataLoader hands its first task to worker 0: rotate so worker i plays the stream of batch start+i.
    return [roles[(start + i) % streams] for i in range(streams)]


def num_batches(count: int, train: bool, world: int, batch_size: int) -> int:
    if train:
        return count // (world * batch_size)
    return math.ceil(math.ceil(count / world) / batch_size)


def continue_at(batch: int, old_samples_per_batch: int, new_samples_per_batch: int) -> int:
    """The batch a resumed epoch continues at after the layout changed (world size x batch size): the one
    that has consumed the same number of samples, rounded down."""
    return batch * old_samples_per_batch // new_samples_per_batch
