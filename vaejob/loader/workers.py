"""Loader worker processes: a shared-memory batch ring, persistent workers, and SIGTERM survival.

Workers collate uint8 (N, C, H, W) batches into a shared-memory ring and send only the slot number; the
consumer makes its own copy and releases the slot. Worker processes start at the first epoch and serve
every later one: each ``iter()`` they read the new position (epoch, first batch, seed) from shared memory,
so ``set_epoch`` / ``load_state_dict`` need no restart (each start costs a fork, a ring of fresh shared
pages and a DataLoader hand-shake: ~20% of a short epoch).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaejob.loader.pipeline import run_stream
from vaejob.loader.plan import plan_epoch
from vaejob.shards.codec import Decoder
from vaejob.shards.format import SplitShards


@dataclass(frozen=True)
class StreamSpec:
    """Everything but the position that shapes one rank's streams of a split."""

    split: SplitShards
    train: bool
    rank: int
    world: int
    batch_size: int
    streams: int
    shuffle_buffer: int
    with_keys: bool
    decoder: Decoder


class Slots:
    """A ring of ``depth`` batch buffers per worker in shared memory, mapped by the consumer before the
    workers start (one ring for the workers' lifetime): a worker fills a slot and sends only its number,
    the consumer reads it in place.

    Sending a fresh shared tensor per batch instead costs more CPU than reading and decoding the batch
    (a new shm file, page faults on both sides, a file-descriptor hand-over through a socket). A worker
    reuses a slot only after the consumer has released it; with ``depth`` > prefetch_factor + 1 the
    DataLoader's bound on tasks in flight means the wait never happens: it is a guard.
    """

    def __init__(self, workers: int, depth: int, shape: tuple[int, int, int, int]) -> None:
        self.depth, self.consumer = depth, os.getpid()
        # Created like default_collate's batches: pages are committed on first write, not here.
        storage = torch.UntypedStorage._new_shared(workers * depth * math.prod(shape))
        self.images = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (workers, depth, *shape))
        self.released = torch.zeros(workers, dtype=torch.int64).share_memory_()  # batches done, per worker

    def acquire(self, worker: int, index: int) -> np.ndarray:
        while int(self.released[worker]) <= index - self.depth:
            try:
                os.kill(self.consumer, 0)
            except ProcessLookupError:
                raise SystemExit(1) from None  # the consumer died without releasing: nobody will
            time.sleep(0.0005)
        return self.images[worker, index % self.depth].numpy()

    def release(self, worker: int, index: int) -> None:
        self.released[worker] = index + 1

    def release_all(self) -> None:
        """Unblock every worker (the consumer stops early): nothing is read from the slots any more."""
        self.released.fill_(2**62)


class EpochDataset(IterableDataset):
    """What every worker runs: the epoch, first batch and seed are read from shared memory at each
    ``iter()``, so persistent workers follow ``set_epoch`` / ``load_state_dict`` without a restart.
    Without slots (``num_workers=0``) it runs the single stream in the consumer process."""

    def __init__(self, spec: StreamSpec, slots: Slots | None) -> None:
        self.spec, self.slots = spec, slots
        self.where = torch.zeros(3, dtype=torch.int64)  # (epoch, first batch, seed) of the next iter()
        if slots is not None:
            self.where.share_memory_()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s, info = self.spec, get_worker_info()
        worker = 0 if info is None else info.id
        epoch, start, seed = self.where.tolist()
        plan = plan_epoch(
            s.split,
            train=s.train,
            seed=seed,
            epoch=epoch,
            rank=s.rank,
            world=s.world,
            batch_size=s.batch_size,
            streams=s.streams,
            start=start,
        )
        stream = plan[worker]
        if info is None or self.slots is None:  # in the consumer process: a fresh array per batch
            return run_stream(stream, s.decoder, s.batch_size, s.shuffle_buffer, s.with_keys)
        slots = self.slots
        # A new epoch restarts this worker's batch count. Safe here: the previous epoch's tasks ran
        # before this iter() (one queue per worker), and the consumer releases only new batches.
        slots.released[worker] = 0
        buffered = run_stream(
            stream, s.decoder, s.batch_size, s.shuffle_buffer, s.with_keys, lambda i: slots.acquire(worker, i)
        )
        return ({"worker": worker, **b} for b in buffered)


class WorkerPool:
    """One loader's persistent worker processes, its shared-memory ring and their DataLoader."""

    def __init__(self, spec: StreamSpec, num_workers: int, prefetch_factor: int) -> None:
        self.slots = Slots(num_workers, prefetch_factor + 2, (spec.batch_size, *spec.decoder.shape))
        self.dataset = EpochDataset(spec, self.slots)
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=True,
            prefetch_factor=prefetch_factor,
            # Its own generator: iterating must not draw from the global torch RNG, or a resumed job
            # (which starts a fresh iterator mid-epoch) would see different noise than a straight run.
            generator=torch.Generator(),
            collate_fn=_as_is,
            worker_init_fn=survive_foreign_sigterm,
        )

    def epoch(
        self, epoch: int, start: int, seed: int, take: Callable[[np.ndarray], Any]
    ) -> Iterator[dict[str, Any]]:
        """Batches from ``start`` on; ``take`` copies a slot's images out before the slot is released."""
        self.dataset.where.copy_(torch.tensor([epoch, start, seed]))
        with sigterm_blocked():  # the first iter() forks the workers
            batches = iter(self.loader)
        slots = self.slots
        try:
            for batch in batches:
                worker, index = batch.pop("worker"), batch.pop("index")
                batch["image"] = take(slots.images[worker, index % slots.depth].numpy())
                slots.release(worker, index)
                yield batch
        finally:
            slots.release_all()

    def close(self) -> None:
        iterator = self.loader._iterator  # None until the first iter(); torch has no public shutdown
        if iterator is not None:
            iterator._shutdown_workers()


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """collate_fn: keep the worker's numpy labels (default_convert would make tensors, each of which
    travels as a shared-memory file with its own file-descriptor hand-over)."""
    return batch


@contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Workers forked in here start with SIGTERM blocked (a fork inherits the mask, not pending signals), so
    a step-wide SIGTERM cannot kill one before ``survive_foreign_sigterm`` runs; one sent to this process
    meanwhile waits, then reaches its handler."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def survive_foreign_sigterm(_: int) -> None:
    """Slurm's SIGTERM (scancel, preemption) reaches every process of a job step, loader workers included.
    torch's worker handler dies on a SIGTERM that its parent did not send, which would crash the epoch before
    the trainer can checkpoint; here only the parent's SIGTERM (shutdown) ends a worker."""
    parent = os.getppid()
    signal.pthread_sigmask(
        signal.SIG_BLOCK, {signal.SIGTERM}
    )  # before the thread starts: it inherits the mask

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, daemon=True, name="sigterm").start()


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """collate_fn: keep the worker's numpy labels (default_convert would make tensors, each of which
    travels as a shared-memory file with its own file-descriptor hand-over)."""
    return batch
