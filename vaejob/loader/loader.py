"""The loader API: ``make_loader`` and ``ShardLoader``, exact, resumable and DDP-safe (docs/CONTRACTS.md).

One ``iter()`` is one epoch from the loader's current position; the layout of every epoch is planned by
``vaejob.loader.plan``. Resume: ``state_dict()`` records the epoch and the batches the consumer has received
(plus ``num_workers``, which shapes the order). At the same world size, batch size and worker count,
``load_state_dict`` continues the epoch exactly: streams fast-forward past the consumed batches (raw bytes
only) and the remaining batches equal, in order, those of an uninterrupted run. If the layout changed, the
epoch continues from the same fraction of samples consumed under the new layout: within that one epoch some
samples may repeat and others be skipped; later epochs are exact again, and a warning says so.

Images leave the workers as uint8 and the consumer makes its own copy, as float32 / 255 unless ``raw=True``
(the trainer converts on the device: 4x less host-to-device traffic). ``binarize`` (``vaejob.loader.binarize``)
replaces each image by its Bernoulli draw, made on ``device`` from the sample keys, seed and epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vaejob.loader.batch import Batch, np_unit_float, unit_float
from vaejob.loader.binarize import Binarize, bernoulli_draw, key_seeds, salt
from vaejob.loader.plan import continue_at, num_batches
from vaejob.loader.workers import EpochDataset, StreamSpec, WorkerPool
from vaejob.shards.codec import Decoder
from vaejob.shards.format import DataError, ShardSet
from vaejob.shards.open import open_shards
from vaejob.storage import StorageError

log = logging.getLogger(__name__)
MAX_SKIP_WARNINGS = 10  # per epoch and rank: the count goes on, the log does not fill up


class ShardLoader:
    """Iterates one epoch per ``iter()`` from its current position (see the module docstring)."""

    def __init__(
        self,
        shards: ShardSet,
        split: str,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        num_workers: int,
        shuffle_buffer: int,
        raw: bool,
        pin_memory: bool,
        prefetch_factor: int,
        with_keys: bool,
        binarize: Binarize = "none",
        device: torch.device | str = "cpu",
    ) -> None:
        if binarize not in ("none", "static", "dynamic"):
            raise ValueError(f"binarize must be none, static or dynamic (got {binarize!r})")
        self.shards, self.split_name = shards, split
        self.split = shards.split(split)
        self.train = split == "train"
        self.batch_size, self.seed, self.epoch, self.batch = batch_size, seed, epoch, 0
        # Samples of an indexed set whose image could not be decoded: this epoch so far (part of the
        # state, so a resumed epoch goes on counting) and the whole of the last finished epoch.
        self.skipped = self.last_epoch_skipped = 0
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.raw, self.pin_memory, self.prefetch_factor = raw, pin_memory, prefetch_factor
        self.with_keys = with_keys
        self.binarize, self.device = binarize, torch.device(device)
        self.spec = StreamSpec(
            split=self.split,
            train=self.train,
            rank=rank,
            world=world_size,
            batch_size=batch_size,
            streams=self.streams,
            shuffle_buffer=shuffle_buffer,
            with_keys=with_keys or binarize != "none",  # the draw is seeded by the sample key
            decoder=Decoder.for_set(shards),
        )
        self._pool: WorkerPool | None = None
        if self.train and len(self) == 0:  # an empty val split just yields nothing
            raise DataError(
                f"split {split!r} of {shards.root} has {self.split.count} samples, fewer than "
                f"world_size x batch_size = {world_size * batch_size}; lower the batch size"
            )

    @property
    def num_samples(self) -> int:
        return self.split.count

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shards.image_shape

    @property
    def num_classes(self) -> int:
        return self.shards.num_classes

    @property
    def streams(self) -> int:
        return max(1, self.num_workers)

    def __len__(self) -> int:
        return num_batches(self.split.count, self.train, self.world_size, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch, self.skipped = int(epoch), 0, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "skipped": self.skipped,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        if "seed" in state and int(state["seed"]) != self.seed:
            log.warning(
                "data: resuming with the checkpoint's seed %s (loader had %s)", state["seed"], self.seed
            )
            self.seed = int(state["seed"])
        world = int(state.get("world_size", self.world_size))
        bs = int(state.get("batch_size", self.batch_size))
        workers = int(state.get("num_workers", self.num_workers))
        batch = int(state["batch"])
        if (world, bs, max(1, workers)) != (self.world_size, self.batch_size, self.streams):
            batch = continue_at(batch, world * bs, self.world_size * self.batch_size)
            log.warning(
                "data: layout changed (world_size %d->%d, batch_size %d->%d, num_workers %d->%d): epoch %d "
                "continues at batch %d from the same fraction consumed; within this epoch some samples may "
                "repeat or be skipped, later epochs are exact",
                world, self.world_size, bs, self.batch_size, workers, self.num_workers, self.epoch, batch,
            )  # fmt: skip
        self.batch = min(batch, len(self))
        self.skipped = int(state.get("skipped", 0)) if self.batch else 0

    def __iter__(self) -> Iterator[Batch]:
        start = self.batch
        if start < len(self):
            error = None
            batches = self._batches(start)
            try:
                for batch in batches:
                    image = batch["image"]
                    if self.binarize != "none":
                        image = self._binarized(image, batch["key"])
                    out: Batch = {
                        "image": image,
                        "label": torch.from_numpy(batch["label"]),
                        "valid": torch.from_numpy(batch["valid"]),
                    }
                    if self.with_keys:
                        out["key"] = batch["key"]
                    for reason in batch["skipped"]:
                        if self.skipped < MAX_SKIP_WARNINGS:
                            log.warning("data: skipped a sample of %s: %s", self.split_name, reason)
                        self.skipped += 1
                    self.batch += 1  # counted when the consumer receives it, not when prefetched
                    yield out
            except (DataError, StorageError) as e:  # a worker's error arrives with a traceback: keep its line
                error = type(e)(_last_line(e))
            except GeneratorExit:  # the consumer stopped mid-epoch: the workers wait for the next iter()
                raise
            except BaseException:
                self.close()
                raise
            finally:
                batches.close()  # releases the ring's slots at once, even when the consumer stopped early
            if error is not None:
                self.close()
                raise error
        self.epoch += 1
        self.batch = 0
        self.last_epoch_skipped, self.skipped = self.skipped, 0

    def _batches(self, start: int) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:  # the single stream, read in this process
            dataset = EpochDataset(self.spec, None)
            dataset.where.copy_(torch.tensor([self.epoch, start, self.seed]))
            return ({**b, "image": self._take(b["image"], owned=True)} for b in iter(dataset))
        if self._pool is None:
            self._pool = WorkerPool(self.spec, self.num_workers, self.prefetch_factor)
        return self._pool.epoch(self.epoch, start, self.seed, self._take)

    def _binarized(self, images: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """The batch's Bernoulli draw on ``device``: uint8 0 / 255, or float 0 / 1 unless raw."""
        seeds = key_seeds(salt(self.binarize, self.seed, self.epoch), keys)
        out = bernoulli_draw(images.to(self.device, non_blocking=True), seeds)
        return out if self.raw else unit_float(out)

    def _take(self, images: np.ndarray, owned: bool = False) -> torch.Tensor:
        """The consumer's copy of a uint8 batch: float32 / 255 unless raw (or binarised: the draw reads
        uint8); pinned when asked (CUDA)."""
        pin = self.pin_memory and torch.cuda.is_available()
        if not self.raw and self.binarize == "none":
            out = torch.from_numpy(np_unit_float(images))
            return out.pin_memory() if pin else out
        if pin:
            return torch.from_numpy(images).pin_memory()  # the pinned copy is the consumer's own
        return torch.from_numpy(images if owned else images.copy())

    def close(self) -> None:
        """Stops the worker processes now (else they live as long as the loader). Iterating restarts them."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last_line(e: BaseException) -> str:
    line = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1].strip()
    for cls in type(e).__mro__:  # the worker's traceback ends in "module.Class: message"
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        if line.startswith(prefix):
            return line[len(prefix) :]
    return line


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def make_loader(
    shards: ShardSet | str,
    split: str,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 2,
    shuffle_buffer: int = 2000,
    raw: bool = False,
    verify: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
    with_keys: bool = False,
    binarize: Binarize = "none",
    device: torch.device | str = "cpu",
) -> ShardLoader:
    """Loader for one split of a shard set; rank / world size default to torch.distributed, then the
    RANK / WORLD_SIZE environment, then 0 / 1. ``with_keys`` adds the sample keys (``""`` for padding).
    ``binarize`` static / dynamic yields each image's Bernoulli draw, made and yielded on ``device``."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
    rank, world_size = _dist_defaults(rank, world_size)
    return ShardLoader(
        open_shards(shards, verify=verify),
        split,
        batch_size,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        raw=raw,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        with_keys=with_keys,
        binarize=binarize,
        device=device,
    )
