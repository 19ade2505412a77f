"""The stages one stream runs: read its shard segments -> shuffle buffer -> fast-forward -> decode + collate.

Samples stay raw bytes in the shuffle buffer and are decoded only when a batch is emitted; a resumed stream
fast-forwards past the consumed batches without decoding anything.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice, repeat
from typing import Any

import numpy as np

from vaejob.loader.plan import Stream
from vaejob.shards.codec import BadImage, Decoder
from vaejob.shards.format import DataError
from vaejob.shards.tar import Raw, read_segment


def shuffled(items: Iterable[Raw], size: int, rng: random.Random) -> Iterator[Raw]:
    """A shuffle buffer of ``size`` items (webdataset's scheme: emit a random slot, refill it)."""
    buf: list[Raw] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


def collate(
    decoder: Decoder, samples: list[Raw | None], images: np.ndarray, with_keys: bool, fill: bool = False
) -> dict[str, Any]:
    """Decode ``samples`` into ``images`` (N, C, H, W) uint8; returns labels, the valid mask, the reasons
    of skipped samples (and keys). ``None`` is val padding: zeros, label -1, not valid, key ``""``.

    An image of an indexed set that cannot be decoded is skipped, never fatal, and the batch keeps its
    size (every rank must yield the same batches): with ``fill`` (train) its slot repeats the nearest
    good sample of the batch, else (val) it becomes a padding slot, so each good sample counts once."""
    n = len(samples)
    labels = np.full(n, -1, np.int64)
    valid = np.zeros(n, np.bool_)
    keys = []
    skipped: list[str] = []
    for i, s in enumerate(samples):
        if s is None:
            images[i] = 0
            keys.append("")
            continue
        url, key, members = s
        try:
            images[i] = decoder.image(url, key, members).transpose(2, 0, 1)
            labels[i] = _label(url, key, members)
        except BadImage as e:
            if not decoder.tolerant:
                raise
            images[i] = 0
            keys.append("")
            skipped.append(str(e))
            continue
        valid[i] = True
        keys.append(key)
    if skipped and fill and valid.any():
        good = np.flatnonzero(valid)
        for i in np.flatnonzero(~valid):
            j = int(good[np.abs(good - i).argmin()])
            images[i], labels[i], valid[i], keys[i] = images[j], labels[j], True, keys[j]
    batch: dict[str, Any] = {"label": labels, "valid": valid, "skipped": skipped}
    if with_keys:
        batch["key"] = keys
    return batch


def _label(url: str, key: str, members: dict[str, bytes]) -> int:
    cls = members.get("cls")
    if cls is None:
        return -1
    try:
        return int(cls)
    except ValueError:
        raise BadImage(f"{key}.cls in {url} is not an integer; re-create the shard set") from None


def run_stream(
    stream: Stream,
    decoder: Decoder,
    batch_size: int,
    shuffle_buffer: int,
    with_keys: bool,
    buffer_for: Callable[[int], np.ndarray] | None = None,
) -> Iterator[dict[str, Any]]:
    """The stream's batches. Without ``buffer_for`` each batch carries a fresh ``image`` array; with it,
    batch ``index`` is decoded into ``buffer_for(index)`` (a shared-memory slot) and carries its ``index``."""
    raw: Iterable[Raw] = chain.from_iterable(
        read_segment(url, a, b, total, decoder.wanted, picks) for url, a, b, total, picks in stream.segments
    )
    if stream.seed is not None and shuffle_buffer > 1:
        raw = shuffled(raw, shuffle_buffer, random.Random(stream.seed))
    samples: Iterator[Raw | None] = chain(raw, repeat(None, stream.pad))
    for _ in range(stream.skip * batch_size):  # fast-forward: the raw bytes go by undecoded
        next(samples)
    c, h, w = decoder.shape
    fill = stream.seed is not None  # train streams are seeded (shuffled); val keeps exact counts
    for index in range(stream.batches):
        chunk = list(islice(samples, batch_size))
        if len(chunk) != batch_size:
            raise DataError(f"the shards hold fewer samples than the manifest lists: {stream.segments}")
        if buffer_for is None:
            images = np.empty((batch_size, c, h, w), np.uint8)
            yield {"image": images, **collate(decoder, chunk, images, with_keys, fill)}
        else:
            yield {"index": index, **collate(decoder, chunk, buffer_for(index), with_keys, fill)}
