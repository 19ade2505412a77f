"""Exact, resumable, DDP-safe loading of vaejob shard sets (see docs/CONTRACTS.md).

Design. A split is a list of tar shards whose sample counts are known from ``manifest.json``. Each epoch
the shards are put in an order (train: a permutation drawn from ``(seed, epoch)``; val: manifest order) and
concatenated into one global sample stream.

- Train: every rank gets the same quota ``Q = floor(N / (world * B)) * B`` samples, a contiguous slice of
  the stream (the global remainder is dropped). Slices may cut shards mid-way, so any number of shards
  works with any number of ranks and workers, and every rank yields exactly ``Q / B`` batches (unequal
  batch counts hang DDP).
- Val (any split but ``train``): every rank gets a contiguous ``ceil(N / world)`` slice, padded to whole
  batches with ``valid=False`` samples (image zeros, label -1): every sample is counted exactly once across
  ranks, and all ranks yield the same number of batches.
- Within a rank the slice is split among ``S = max(1, num_workers)`` streams in whole batches: stream ``w``
  owns a contiguous block of the slice, reads its segments (shard, first sample, last sample) in order,
  shuffles through a buffer seeded by ``(seed, epoch, rank, w)`` (train only) and yields collated
  batches. The consumer receives batches round-robin across streams, so batch ``k`` of the epoch is
  batch ``k // S`` of stream ``k % S``: the whole epoch is a pure function of
  ``(manifest, seed, epoch, rank, world_size, batch_size, num_workers, shuffle_buffer)``.
  ``num_workers=0`` reads the single stream in the consumer process.

Resume. ``state_dict()`` records the epoch and the number of batches the consumer has received (and
``num_workers``, which shapes the order). At the same world size, batch size and worker count,
``load_state_dict`` continues the epoch exactly: streams fast-forward past the consumed batches (raw bytes
only, nothing is decoded) and the remaining batches are identical, in the same order, to those of an
uninterrupted run. If the world size, batch size or worker count changed, the epoch continues from the
same fraction of samples consumed (``batch = floor(consumed_samples / (world * B))``) under the new layout:
within that one epoch some samples may repeat and others be skipped; later epochs are exact again. A
warning is logged.

Reading. Shards are read as byte streams with a large buffer; ustar headers are parsed here (about 10x
cheaper per sample than ``tarfile``/webdataset). Samples stay raw bytes in the shuffle buffer and are
decoded only when emitted. Workers collate uint8 (N,C,H,W) batches into a shared-memory ring and send only
the slot number; the consumer process makes its own copy, as float32 / 255 unless ``raw=True`` (the
trainer converts on the device: 4x less host-to-device traffic). Worker processes start at the first
``iter()`` and serve every later epoch (they read the new position from shared memory); ``close()`` or
``with make_loader(...) as loader:`` stops them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import re
import signal
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice, repeat
from typing import IO, Any

import braceexpand
import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaejob import storage

log = logging.getLogger(__name__)

FORMAT = "vaejob-shards/1"
ENCODINGS = ("npy", "png", "jpg")
_SHARD_CMD = "python -m vaejob.shard --source ... --out"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.tar$")
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_CHUNK = 4 << 20  # read size: few syscalls / object-store requests per shard
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_NPY_HEADER = re.compile(  # what np.save writes (keys sorted), e.g. {'descr': '|u1', 'fortran_order': ...
    r"\{'descr': '(?P<descr>[^']+)', 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>[0-9, ]*)\), *\}"
)


class DataError(Exception):
    """A shard set cannot be used; the message is one line naming the file and the fix."""


# --------------------------------------------------------------------------------------------- shard set
@dataclass(frozen=True)
class SplitShards:
    """The shards of one split, in manifest order."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class ShardSet:
    """A validated shard set. ``num_classes`` is 0 when the source has no labels."""

    root: str
    manifest: dict[str, Any]
    splits: dict[str, SplitShards]
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    encoding: str

    def split(self, name: str) -> SplitShards:
        if name not in self.splits:
            raise DataError(
                f"split {name!r} not in {storage.join(self.root, 'manifest.json')} "
                f"(it has {sorted(self.splits)}); re-create the shard set with that split"
            )
        return self.splits[name]


def _resolve(spec: str) -> tuple[str, list[str] | None]:
    """Return (root, shard names the spec selects or None for the whole set)."""
    spec = spec.strip()
    if "{" in spec or spec.endswith(".tar"):
        urls = list(braceexpand.braceexpand(spec))
        root = storage.dirname(urls[0])
        if any(storage.dirname(u) != root for u in urls):
            raise DataError(f"{spec}: all shards must be in one directory beside manifest.json")
        return root, [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]
    if spec.rstrip("/").endswith("manifest.json"):
        return storage.dirname(spec), None
    return spec.rstrip("/") or spec, None


def _listing(root: str, names: list[str]) -> dict[str, int]:
    """Sizes of the files in ``root`` that exist (one listing request on object stores)."""
    if storage.is_url(root):
        try:
            fs, path = fsspec.core.url_to_fs(root)
            return {
                str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e["size"] or 0)
                for e in fs.ls(path, detail=True)
            }
        except (OSError, NotImplementedError):
            pass  # fall back to one request per shard
    sizes = {}
    for name in names:
        url = storage.join(root, name)
        try:
            sizes[name] = storage.size(url)
        except (FileNotFoundError, OSError):
            pass
    return sizes


def _sha256(url: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _parse_manifest(
    root: str, manifest: Any
) -> tuple[dict[str, SplitShards], tuple[int, int, int], int, str]:
    mpath = storage.join(root, "manifest.json")
    fix = f"re-create the shard set with {_SHARD_CMD} {root}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{mpath}: unknown manifest format {fmt!r} (this vaejob reads {FORMAT!r}); {fix}")
    try:
        image = manifest["image"]
        shape = (int(image["channels"]), int(image["height"]), int(image["width"]))
        encoding = str(manifest["encoding"])
        labels = manifest.get("labels")
        num_classes = int(labels["num_classes"]) if labels else 0
        splits: dict[str, SplitShards] = {}
        for name, split in manifest["splits"].items():
            shards = split["shards"]
            for s in shards:
                if not _SHARD_NAME.match(str(s["name"])):
                    raise DataError(f"{mpath}: bad shard name {s['name']!r}; {fix}")
            counts = tuple(int(s["count"]) for s in shards)
            if sum(counts) != int(split["count"]):
                raise DataError(
                    f"{mpath}: split {name!r} count {split['count']} != sum of its shard counts "
                    f"{sum(counts)} (manifest edited or damaged); {fix}"
                )
            splits[name] = SplitShards(tuple(storage.join(root, s["name"]) for s in shards), counts)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{mpath}: malformed manifest ({type(e).__name__}: {e}); {fix}") from None
    if encoding not in ENCODINGS or shape[0] not in _PIL_MODES or min(shape) < 1:
        raise DataError(f"{mpath}: unsupported encoding {encoding!r} or image shape {shape}; {fix}")
    return splits, shape, num_classes, encoding


def open_shards(spec: str | ShardSet, verify: bool = False) -> ShardSet:
    """Open and validate a shard set before any training starts.

    ``spec`` is a shard-set directory / URL prefix holding ``manifest.json``, the manifest itself, or a
    brace pattern / single shard path (``s3://b/fmnist/train-{000000..000099}.tar``) that must name exactly
    the shards of one split. Checks: manifest present and readable, every shard present with the manifest's
    byte size, every shard's first sample parseable with the manifest's image shape, and (``verify``) every
    shard's sha256. Raises ``DataError`` with a one-line message otherwise.
    """
    if isinstance(spec, ShardSet):
        return spec
    root, selected = _resolve(spec)
    mpath = storage.join(root, "manifest.json")
    if not storage.exists(mpath):
        raise DataError(f"not a shard set: {mpath} not found; create one with {_SHARD_CMD} {root}")
    try:
        manifest = storage.read_json(mpath)
    except (OSError, ValueError) as e:
        raise DataError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e}); re-copy it") from None
    splits, shape, num_classes, encoding = _parse_manifest(root, manifest)

    if selected is not None:
        match = [n for n, s in splits.items() if {u.rsplit("/", 1)[-1] for u in s.urls} == set(selected)]
        if not match:
            sizes = ", ".join(f"{n}: {len(s.urls)}" for n, s in splits.items())
            raise DataError(
                f"{spec} expands to {len(selected)} shards that are not exactly one split of {mpath} "
                f"(shards per split: {sizes}); pass the directory {root} instead"
            )

    entries = [s for split in manifest["splits"].values() for s in split["shards"]]
    names = [str(s["name"]) for s in entries]
    sizes = _listing(root, names)
    for s in entries:
        url = storage.join(root, s["name"])
        if s["name"] not in sizes:
            raise DataError(
                f"missing shard: {url} (listed in {mpath}); re-copy the shard set or re-create it"
            )
        if sizes[s["name"]] != int(s["bytes"]):
            raise DataError(
                f"truncated or modified shard: {url} is {sizes[s['name']]} bytes, manifest says {s['bytes']}; "
                "re-copy it or re-create the shard set"
            )

    decoder = _Decoder(encoding, shape)
    heads = [u for sp in splits.values() for u, c in zip(sp.urls, sp.counts, strict=True) if c > 0]
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(heads)))) as pool:
        # First sample of every shard: catches corrupt headers and shape/encoding mismatches up front.
        list(pool.map(lambda url: _check_head(url, decoder), heads))
        if verify:
            urls = [storage.join(root, n) for n in names]
            for s, url, digest in zip(entries, urls, pool.map(_sha256, urls), strict=True):
                if digest != s["sha256"]:
                    raise DataError(
                        f"sha256 mismatch: {url} is {digest[:12]}..., manifest says {str(s['sha256'])[:12]}...; "
                        "the shard is damaged, re-copy it or re-create the shard set"
                    )
    return ShardSet(root, manifest, splits, shape, num_classes, encoding)


def _check_head(url: str, decoder: _Decoder) -> None:
    with storage.open_read(url) as f:
        key, members = next(_iter_samples(_TarStream(f, url, chunk=8192), url, 0, 1, None, decoder.wanted))
    decoder.image(url, key, members)


# ----------------------------------------------------------------------------------------------- tar read
class _TarStream:
    """Sequential reader over a byte stream through one reused buffer (no per-read allocations)."""

    def __init__(self, f: IO[bytes], url: str, chunk: int = _CHUNK) -> None:
        self.f, self.url = f, url
        self.buf = bytearray(chunk)
        self.view = memoryview(self.buf)
        self.pos = self.end = self.base = 0  # base: file offset of buf[0]
        try:
            self.seekable = bool(f.seekable())
        except (AttributeError, OSError):
            self.seekable = False

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def _refill(self, n: int) -> None:
        """Make ``n`` bytes available at ``pos`` unless the file ends first."""
        rest = bytes(self.view[self.pos : self.end])  # at most one member: small
        self.base += self.pos
        if n > len(self.buf):  # a member larger than the buffer
            self.view.release()
            self.buf = bytearray(n)
            self.view = memoryview(self.buf)
        self.view[: len(rest)] = rest
        self.pos, self.end = 0, len(rest)
        while self.end < n:
            got = self._readinto(self.view[self.end :])
            if not got:
                break
            self.end += got

    def _readinto(self, target: memoryview) -> int:
        if hasattr(self.f, "readinto"):
            return self.f.readinto(target) or 0
        data = self.f.read(len(target))
        target[: len(data)] = data
        return len(data)

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at the end of the file."""
        if self.end - self.pos < n:
            self._refill(n)
        data = bytes(self.view[self.pos : min(self.pos + n, self.end)])
        self.pos += len(data)
        return data

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise DataError(
                f"truncated shard: {self.url} ends at byte {self.offset} inside a tar member; "
                "re-copy it or re-create the shard set"
            )
        return data

    def skip(self, n: int) -> None:
        if n <= self.end - self.pos:
            self.pos += n
            return
        n -= self.end - self.pos
        self.base += self.end
        self.pos = self.end = 0
        if self.seekable and n > len(self.buf):
            self.base += n
            self.f.seek(self.base)
            return
        while n > 0:
            got = self._readinto(self.view[: min(n, len(self.buf))])
            if not got:
                self.read_exact(1)  # raises the truncation error
            n -= got
            self.base += got

    # take / drop / member run ~3x per sample: each has a fast path for data already in the buffer.
    def take(self, size: int) -> bytes:
        """A member's payload; its block padding is consumed too."""
        pos, step = self.pos, size + (-size % _BLOCK)
        if self.end - pos >= step:
            self.pos = pos + step
            return bytes(self.view[pos : pos + size])
        data = self.read_exact(size)
        self.skip(step - size)
        return data

    def drop(self, size: int) -> None:
        step = size + (-size % _BLOCK)
        if self.end - self.pos >= step:
            self.pos += step
        else:
            self.skip(step)

    def member(self) -> tuple[str, int] | None:
        """Name and size of the next regular file (payload not consumed); None at the end of the archive.

        Honours pax ``path``/``size`` records and GNU long names; directories, links and global pax
        headers are skipped.
        """
        name_override: str | None = None
        size_override: int | None = None
        while True:
            pos = self.pos
            if self.end - pos >= _BLOCK:
                hdr = bytes(self.view[pos : pos + _BLOCK])
                self.pos = pos + _BLOCK
            else:
                hdr = self.read(_BLOCK)
                if len(hdr) < _BLOCK:
                    if hdr:
                        self.read_exact(_BLOCK - len(hdr))
                    return None  # no end-of-archive blocks: lenient like tarfile; counts are checked anyway
            if hdr == _ZERO_BLOCK:
                return None
            try:  # common case: octal digits ended by NUL / space
                stored = int(hdr[148:156].replace(b"\0", b" "), 8)
                size = int(hdr[124:136].replace(b"\0", b" "), 8)
            except ValueError:
                at = self.offset - _BLOCK
                stored, size = _octal(hdr[148:156], self.url, at), _octal(hdr[124:136], self.url, at)
            # Checksum = byte sum with its own field read as spaces. adler32's low half is (1 + byte sum)
            # mod 65521: the sum at C speed (~20x cheaper than sum()); one damaged byte can never wrap.
            if ((zlib.adler32(hdr) & 0xFFFF) - 1 - sum(hdr[148:156]) + 256 - stored) % 65521:
                raise DataError(
                    f"corrupt tar header in {self.url} at byte {self.offset - _BLOCK} (checksum mismatch); "
                    "the shard is damaged, re-copy it or re-create the shard set"
                )
            kind = hdr[156:157]
            if kind in (b"0", b"\0", b"7"):
                if name_override is None:
                    name = hdr[:100].split(b"\0", 1)[0]
                    if hdr[345] and hdr[257:263] == b"ustar\0":  # POSIX prefix (old GNU keeps times there)
                        name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
                    name_override = name.decode("utf-8", "replace")
                return name_override, size if size_override is None else size_override
            if kind == b"x":
                for key, value in _pax(self.take(size), self.url, self.offset):
                    if key == "path":
                        name_override = value
                    elif key == "size":
                        size_override = int(value)
            elif kind == b"L":
                name_override = self.take(size).split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                self.drop(size)


def _octal(field: bytes, url: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise DataError(
            f"corrupt tar header in {url} at byte {offset} (bad number field); "
            "the shard is damaged, re-copy it or re-create the shard set"
        ) from None


def _pax(data: bytes, url: str, offset: int) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(data) and data[pos] != 0:
        try:
            length = int(data[pos : data.index(b" ", pos)])
            key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        except ValueError:
            raise DataError(
                f"corrupt pax header in {url} at byte {offset}; re-create the shard set"
            ) from None
        yield key.decode("utf-8"), value.decode("utf-8")
        pos += length


Raw = tuple[str, str, dict[str, bytes]]  # (shard url, key, {extension: payload})


def _iter_samples(
    tar: _TarStream, url: str, start: int, stop: int, total: int | None, wanted: frozenset[str]
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples ``start..stop-1`` of a shard as (key, {ext: bytes}); members outside ``wanted`` and samples
    before ``start`` are skipped without copying. With ``total``, the shard must hold exactly that many."""
    index, key, sample = -1, None, None
    while True:
        m = tar.member()
        if m is None:
            break
        name, size = m
        dot = name.find(".", name.rfind("/") + 1)
        k, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])
        if k != key:
            if sample is not None:
                yield key, sample
            index, key = index + 1, k
            sample = None
            if index >= stop:
                if total is not None and stop == total:
                    raise DataError(
                        f"{url} holds more than the {total} samples its manifest entry says; "
                        "the manifest does not match the shard, re-create the shard set"
                    )
                return
            if index >= start:
                sample = {}
        if sample is not None and ext in wanted:
            sample[ext] = tar.take(size)
        else:
            tar.drop(size)
    if sample is not None:
        yield key, sample
    if index + 1 < stop:
        raise DataError(
            f"{url} holds {index + 1} samples, its manifest entry says {total if total is not None else stop}; "
            "the shard is truncated or the manifest edited, re-create the shard set"
        )


def _read_segment(url: str, start: int, stop: int, total: int, wanted: frozenset[str]) -> Iterator[Raw]:
    with storage.open_read(url) as f:
        tar = _TarStream(f, url)
        for key, members in _iter_samples(tar, url, start, stop, total, wanted):
            yield url, key, members


# ------------------------------------------------------------------------------------------------ decoding
class _Decoder:
    """Decodes raw samples to uint8 (H, W, C) arrays, validated against the manifest's image shape."""

    def __init__(self, encoding: str, shape: tuple[int, int, int]) -> None:
        self.encoding, self.shape = encoding, shape
        self.wanted = frozenset((encoding, "cls"))
        self._npy_ok = b""  # header prefix already validated: identical for every sample

    def image(self, url: str, key: str, members: dict[str, bytes]) -> np.ndarray:
        data = members.get(self.encoding)
        if data is None:
            raise DataError(
                f"sample {key!r} in {url} has no .{self.encoding} member (it has {sorted(members)}); "
                "re-create the shard set"
            )
        return self._npy(url, key, data) if self.encoding == "npy" else self._pil(url, key, data)

    def _npy(self, url: str, key: str, data: bytes) -> np.ndarray:
        c, h, w = self.shape
        ok = self._npy_ok
        # Every sample of a set has the same header: a prefix match with the last validated one suffices.
        end = len(ok) if ok and data.startswith(ok) else self._npy_header(url, key, data)
        if len(data) - end != h * w * c:
            raise DataError(f"{key}.npy in {url} has {len(data) - end} data bytes, expected {h * w * c}")
        return np.frombuffer(data, np.uint8, count=h * w * c, offset=end).reshape(h, w, c)

    def _npy_header(self, url: str, key: str, data: bytes) -> int:
        """Validate a .npy header against the manifest; returns the offset of the array data."""
        c, h, w = self.shape
        if data[:6] != b"\x93NUMPY" or len(data) < 12 or data[6] not in (1, 2, 3):
            raise DataError(f"{key}.npy in {url} is not a .npy file; re-create the shard set")
        head = 10 if data[6] == 1 else 12
        end = head + int.from_bytes(data[8:head], "little")
        # A regex, not ast.literal_eval (nor np.load, which uses it): concurrent calls from threads can
        # raise "SystemError: AST constructor recursion depth mismatch" on CPython 3.11 (cpython#106905),
        # and open_shards checks shards from a thread pool.
        meta = _NPY_HEADER.fullmatch(data[head:end].decode("latin1").strip())
        try:
            if meta is None:
                raise ValueError
            dtype, fortran = np.dtype(meta["descr"]), meta["fortran"] == "True"
            shape = tuple(int(d) for d in meta["shape"].replace(",", " ").split())
        except (TypeError, ValueError):
            raise DataError(f"{key}.npy in {url} has a corrupt header; re-create the shard set") from None
        if dtype != np.uint8 or fortran or shape not in ((h, w, c), (h, w) if c == 1 else (h, w, c)):
            raise DataError(
                f"{key}.npy in {url} holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, the "
                f"manifest says uint8 {(h, w, c)}; re-create the shard set"
            )
        self._npy_ok = data[:end]
        return end

    def _pil(self, url: str, key: str, data: bytes) -> np.ndarray:
        c, h, w = self.shape
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im if im.mode == _PIL_MODES[c] else im.convert(_PIL_MODES[c]))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(
                f"cannot decode {key}.{self.encoding} in {url} ({e}); re-create the shard set"
            ) from None
        if arr.shape[:2] != (h, w):
            raise DataError(
                f"{key}.{self.encoding} in {url} is {arr.shape[1]}x{arr.shape[0]}, the manifest says {w}x{h}; "
                "re-create the shard set"
            )
        return arr.reshape(h, w, c)

    def collate(self, samples: list[Raw | None], images: np.ndarray, with_keys: bool) -> dict[str, Any]:
        """Decode ``samples`` into ``images`` (N, C, H, W) uint8; returns labels, valid mask (and keys)."""
        n = len(samples)
        labels = np.full(n, -1, np.int64)
        valid = np.zeros(n, np.bool_)
        keys = []
        for i, s in enumerate(samples):
            if s is None:  # val padding
                images[i] = 0
                keys.append("")
                continue
            url, key, members = s
            images[i] = self.image(url, key, members).transpose(2, 0, 1)
            cls = members.get("cls")
            if cls is not None:
                try:
                    labels[i] = int(cls)
                except ValueError:
                    raise DataError(
                        f"{key}.cls in {url} is not an integer; re-create the shard set"
                    ) from None
            valid[i] = True
            keys.append(key)
        batch: dict[str, Any] = {"label": labels, "valid": valid}
        if with_keys:
            batch["key"] = keys
        return batch


class _Slots:
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


# ---------------------------------------------------------------------------------------------- planning
Segment = tuple[str, int, int, int]  # (shard url, first sample, stop sample, shard sample count)


@dataclass(frozen=True)
class _Stream:
    """What one worker reads and yields this epoch."""

    segments: tuple[Segment, ...]
    pad: int  # padding samples after the real ones (val)
    batches: int  # batches still to yield
    skip: int  # batches to fast-forward (shuffled streams only; unshuffled ones start at the offset)
    seed: int | None  # shuffle seed, None = no shuffle


def _seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint64)
    return int(state[0]) ^ (int(state[1]) << 1)


def _segments(split: SplitShards, order: list[int], lo: int, hi: int) -> tuple[Segment, ...]:
    out, offset = [], 0
    for i in order:
        c = split.counts[i]
        a, b = max(lo, offset), min(hi, offset + c)
        if a < b:
            out.append((split.urls[i], a - offset, b - offset, c))
        offset += c
    return tuple(out)


def _plan(
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
) -> list[_Stream]:
    """Streams indexed by DataLoader worker id, for the batches from ``start`` on."""
    order = list(range(len(split.urls)))
    if train:
        random.Random(_seed(seed, epoch)).shuffle(order)
    nb = _num_batches(split.count, train, world, batch_size)
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
            seed_w = _seed(seed, epoch, rank, w)
            segs = _segments(split, order, first, min(last, real_hi))
            roles.append(_Stream(segs, 0, todo, done, seed_w))
        else:  # no shuffle: start reading at the first unconsumed sample
            begin = min(first + done * batch_size, last)
            segs = _segments(split, order, min(begin, real_hi), min(last, real_hi))
            pad = (last - begin) - max(0, min(last, real_hi) - min(begin, real_hi))
            roles.append(_Stream(segs, pad, todo, 0, None))
    # The DataLoader hands its first task to worker 0: rotate so worker i plays the stream of batch start+i.
    return [roles[(start + i) % streams] for i in range(streams)]


def _num_batches(count: int, train: bool, world: int, batch_size: int) -> int:
    if train:
        return count // (world * batch_size)
    return math.ceil(math.ceil(count / world) / batch_size)


def _shuffled(items: Iterable[Raw], size: int, rng: random.Random) -> Iterator[Raw]:
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


def _run_stream(
    s: _Stream,
    decoder: _Decoder,
    batch_size: int,
    shuffle_buffer: int,
    with_keys: bool,
    slots: _Slots | None,
    worker: int,
) -> Iterator[dict[str, Any]]:
    raw: Iterable[Raw] = chain.from_iterable(_read_segment(*seg, decoder.wanted) for seg in s.segments)
    if s.seed is not None and shuffle_buffer > 1:
        raw = _shuffled(raw, shuffle_buffer, random.Random(s.seed))
    samples: Iterator[Raw | None] = chain(raw, repeat(None, s.pad))
    for _ in range(s.skip * batch_size):  # fast-forward: the raw bytes go by undecoded
        next(samples)
    c, h, w = decoder.shape
    for index in range(s.batches):
        chunk = list(islice(samples, batch_size))
        if len(chunk) != batch_size:
            raise DataError(f"the shards hold fewer samples than the manifest lists: {s.segments}")
        if slots is None:  # single process: a fresh array per batch
            images = np.empty((batch_size, c, h, w), np.uint8)
            yield {"image": images, **decoder.collate(chunk, images, with_keys)}
        else:
            images = slots.acquire(worker, index)
            yield {"worker": worker, "index": index, **decoder.collate(chunk, images, with_keys)}


class _EpochDataset(IterableDataset):
    """What every worker runs: the epoch, first batch and seed are read from shared memory at each
    ``iter()``, so persistent workers follow ``set_epoch`` / ``load_state_dict`` without a restart."""

    def __init__(self, loader: ShardLoader, slots: _Slots | None) -> None:
        self.split, self.train = loader.split, loader.train
        self.rank, self.world = loader.rank, loader.world_size
        self.batch_size, self.streams = loader.batch_size, loader.streams
        self.shuffle_buffer, self.with_keys = loader.shuffle_buffer, loader.with_keys
        self.decoder, self.slots = loader._decoder, slots
        self.where = torch.zeros(3, dtype=torch.int64)  # (epoch, first batch, seed) of the next iter()
        if slots is not None:
            self.where.share_memory_()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        epoch, start, seed = self.where.tolist()
        plan = _plan(
            self.split,
            train=self.train,
            seed=seed,
            epoch=epoch,
            rank=self.rank,
            world=self.world,
            batch_size=self.batch_size,
            streams=self.streams,
            start=start,
        )
        slots = None if info is None else self.slots
        if slots is not None:
            # A new epoch restarts this worker's batch count. Safe here: the previous epoch's tasks ran
            # before this iter() (one queue per worker), and the consumer releases only new batches.
            slots.released[worker] = 0
        return _run_stream(
            plan[worker], self.decoder, self.batch_size, self.shuffle_buffer, self.with_keys, slots, worker
        )


# ------------------------------------------------------------------------------------------------ loader
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
    ) -> None:
        self.shards, self.split_name = shards, split
        self.split = shards.split(split)
        self.train = split == "train"
        self.batch_size, self.seed, self.epoch, self.batch = batch_size, seed, epoch, 0
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.raw, self.pin_memory, self.prefetch_factor = raw, pin_memory, prefetch_factor
        self.with_keys = with_keys
        self._decoder = _Decoder(shards.encoding, shards.image_shape)
        self._pool: tuple[_EpochDataset, DataLoader] | None = None
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
        return _num_batches(self.split.count, self.train, self.world_size, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
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
            batch = batch * world * bs // (self.world_size * self.batch_size)
            log.warning(
                "data: layout changed (world_size %d->%d, batch_size %d->%d, num_workers %d->%d): epoch %d "
                "continues at batch %d from the same fraction consumed; within this epoch some samples may "
                "repeat or be skipped, later epochs are exact",
                world, self.world_size, bs, self.batch_size, workers, self.num_workers, self.epoch, batch,
            )  # fmt: skip
        self.batch = min(batch, len(self))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self.batch
        if start < len(self):
            dataset, pool = (_EpochDataset(self, None), None) if self.num_workers == 0 else self._workers()
            dataset.where.copy_(torch.tensor([self.epoch, start, self.seed]))
            slots = dataset.slots
            if pool is None:
                batches: Iterator[dict[str, Any]] = iter(dataset)
            else:
                with _sigterm_blocked():  # the first iter() forks the workers
                    batches = iter(pool)
            error = None
            try:
                for batch in batches:
                    out = {
                        "label": torch.from_numpy(batch["label"]),
                        "valid": torch.from_numpy(batch["valid"]),
                    }
                    if slots is None:
                        out["image"] = self._output_images(batch["image"], owned=True)
                    else:
                        worker, index = batch["worker"], batch["index"]
                        out["image"] = self._output_images(slots.images[worker, index % slots.depth].numpy())
                        slots.release(worker, index)
                    if self.with_keys:
                        out["key"] = batch["key"]
                    self.batch += 1  # counted when the consumer receives it, not when prefetched
                    yield out
            except DataError as e:  # a worker's error arrives wrapped in a traceback: keep its message
                error = _last_line(str(e))
            except GeneratorExit:  # the consumer stopped mid-epoch: the workers wait for the next iter()
                raise
            except BaseException:
                self.close()
                raise
            finally:
                if slots is not None:
                    slots.release_all()
            if error is not None:
                self.close()
                raise DataError(error)
        self.epoch += 1
        self.batch = 0

    def _workers(self) -> tuple[_EpochDataset, DataLoader]:
        """The worker processes, started at the first iteration and kept across epochs (each start costs
        a fork, a ring of fresh shared pages and a DataLoader hand-shake: ~20% of a short epoch)."""
        if self._pool is None:
            shape = (self.batch_size, *self.image_shape)
            dataset = _EpochDataset(self, _Slots(self.num_workers, self.prefetch_factor + 2, shape))
            pool = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=True,
                prefetch_factor=self.prefetch_factor,
                # Its own generator: iterating must not draw from the global torch RNG, or a resumed job
                # (which starts a fresh iterator mid-epoch) would see different noise than a straight run.
                generator=torch.Generator(),
                collate_fn=_as_is,
                worker_init_fn=_survive_foreign_sigterm,
            )
            self._pool = (dataset, pool)
        return self._pool

    def close(self) -> None:
        """Stops the worker processes now (else they live as long as the loader). Iterating restarts them."""
        if self._pool is not None:
            iterator = self._pool[1]._iterator  # None until the first iter()
            if iterator is not None:
                iterator._shutdown_workers()
            self._pool = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _output_images(self, images: np.ndarray, owned: bool = False) -> torch.Tensor:
        """The consumer's copy of a uint8 batch: float32 / 255 unless raw; pinned when asked (CUDA)."""
        pin = self.pin_memory and torch.cuda.is_available()
        if not self.raw:
            out = torch.from_numpy(_to_float(images))
            return out.pin_memory() if pin else out
        if pin:
            return torch.from_numpy(images).pin_memory()  # the pinned copy is the consumer's own
        return torch.from_numpy(images if owned else images.copy())


@contextmanager
def _sigterm_blocked() -> Iterator[None]:
    """Workers forked in here start with SIGTERM blocked (a fork inherits the mask, not pending signals), so
    a step-wide SIGTERM cannot kill one before ``_survive_foreign_sigterm`` runs; one sent to this process
    meanwhile waits, then reaches its handler."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _survive_foreign_sigterm(_: int) -> None:
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


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 / 255, bit-identical to ``tensor.float() / 255``. numpy does it in one
    single-threaded pass into recycled heap memory; torch's two passes over fresh pages cost ~5x more
    here, mostly page faults and OpenMP spinning next to the busy workers."""
    return np.divide(images, np.float32(255), dtype=np.float32)


def _last_line(message: str) -> str:
    line = [ln for ln in message.strip().splitlines() if ln.strip()][-1].strip()
    prefix = f"{DataError.__module__}.{DataError.__name__}: "
    return line[len(prefix) :] if line.startswith(prefix) else line


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
) -> ShardLoader:
    """Loader for one split of a shard set; rank / world size default to torch.distributed, then the
    RANK / WORLD_SIZE environment, then 0 / 1. ``with_keys`` adds the sample keys (``""`` for padding)."""
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
    )
