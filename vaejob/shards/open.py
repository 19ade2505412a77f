"""Open a shard set and check it before any training starts: ``open_shards``.

Checks: the manifest is present and well-formed, every shard exists with the manifest's byte size (one
listing request on object stores), the first sample of every shard parses with the manifest's image shape,
and (``verify``) every shard's sha256. Anything wrong is a ``DataError`` of one line naming the file.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import braceexpand

from vaejob import storage
from vaejob.shards.codec import BadImage, Decoder
from vaejob.shards.format import (
    INDEX_CMD,
    MANIFEST,
    SHARD_CMD,
    DataError,
    ShardSet,
    SplitShards,
    parse_manifest,
)
from vaejob.shards.tar import CHUNK, read_segment


def sha256_file(url: str) -> str:
    """sha256 hex digest of a local file or fsspec URL, read in large chunks."""
    h = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_spec(spec: str) -> tuple[str, list[str] | None]:
    """(root, the shard names a brace pattern / single shard selects, or None for the whole set)."""
    spec = spec.strip()
    if "{" in spec or spec.endswith(".tar"):
        urls = list(braceexpand.braceexpand(spec))
        root = storage.dirname(urls[0])
        if any(storage.dirname(u) != root for u in urls):
            raise DataError(f"{spec}: all shards must be in one directory beside {MANIFEST}")
        return root, [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]
    if spec.rstrip("/").endswith(MANIFEST):
        return storage.dirname(spec), None
    return spec.rstrip("/") or spec, None


def _listing(urls: list[str]) -> dict[str, int]:
    """Sizes of the shards that exist, by URL (one listing request per directory)."""
    sizes: dict[str, int] = {}
    by_dir: dict[str, list[str]] = {}
    for url in dict.fromkeys(urls):
        by_dir.setdefault(storage.dirname(url), []).append(url)
    for folder, members in by_dir.items():
        listed = storage.listdir(folder)
        for url in members:
            size = listed.get(url.rstrip("/").rsplit("/", 1)[-1])
            if size is not None:
                sizes[url] = size
    return sizes


def _check_head(shards: ShardSet, split: SplitShards, i: int, decoder: Decoder) -> None:
    """The first sample of a shard: catches corrupt headers and shape/encoding mismatches up front."""
    url = split.urls[i]
    wanted = decoder.wanted
    _, key, members = next(read_segment(url, 0, 1, split.total(i), wanted, split.pick(i), chunk=8192))
    try:
        decoder.image(url, key, members)
    except BadImage as e:
        if not shards.indexed:
            raise
        raise DataError(
            f"{url} changed since it was indexed (its sample {key!r} no longer decodes: {e}); "
            f"re-run {INDEX_CMD} on it"
        ) from None


def _no_manifest(root: str, mpath: str) -> DataError:
    """The error for a directory without a manifest: foreign tars there want --index, not --source."""
    try:
        tars = storage.is_url(root) is False and any(n.endswith(".tar") for n in os.listdir(root))
    except OSError:
        tars = False
    if tars:
        return DataError(
            f"not a shard set: {mpath} not found, but {root} holds tar shards; index them in place with "
            f"{INDEX_CMD} {root}"
        )
    return DataError(
        f"not a shard set: {mpath} not found; create one with {SHARD_CMD} {root} "
        f"(or index existing WebDataset tars with {INDEX_CMD} DIR_OR_PATTERN)"
    )


def open_shards(
    spec: str | ShardSet,
    verify: bool = False,
    *,
    image_size: int = 0,
    channels: int = 0,
    resize: str = "center_crop",
) -> ShardSet:
    """Open and validate a shard set.

    ``spec`` is a shard-set directory / URL prefix holding ``manifest.json``, the manifest itself, or a
    brace pattern / single shard path (``s3://b/fmnist/train-{000000..000099}.tar``) that must name exactly
    the shards of one split. ``image_size`` / ``channels`` / ``resize`` set the shape the loader yields
    (``ShardSet.with_target``; 0 = the set's own). Raises ``DataError`` with a one-line message.
    """
    if isinstance(spec, ShardSet):
        return spec
    root, selected = resolve_spec(spec)
    mpath = storage.join(root, MANIFEST)
    if not storage.exists(mpath):
        raise _no_manifest(root, mpath)
    try:
        manifest = storage.read_json(mpath)
    except (OSError, ValueError) as e:
        raise DataError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e}); re-copy it") from None
    shards = parse_manifest(root, manifest).with_target(image_size, channels, resize)

    if selected is not None:
        match = [
            n for n, s in shards.splits.items() if {u.rsplit("/", 1)[-1] for u in s.urls} == set(selected)
        ]
        if not match:
            sizes = ", ".join(f"{n}: {len(s.urls)}" for n, s in shards.splits.items())
            raise DataError(
                f"{spec} expands to {len(selected)} shards that are not exactly one split of {mpath} "
                f"(shards per split: {sizes}); pass the directory {root} instead"
            )

    entries = {shards.url_of(s["name"]): s for s in shards.entries}  # an indexed shard may be in 2 splits
    sizes = _listing(list(entries))
    fix = f"re-run {INDEX_CMD} on them" if shards.indexed else "re-copy it or re-create the shard set"
    for url, s in entries.items():
        if url not in sizes:
            raise DataError(f"missing shard: {url} (listed in {mpath}); {fix}")
        if sizes[url] != int(s["bytes"]):
            what = "changed since it was indexed" if shards.indexed else "truncated or modified"
            raise DataError(f"{what}: {url} is {sizes[url]} bytes, manifest says {s['bytes']}; {fix}")

    decoder = Decoder.for_set(shards)
    heads = [(sp, i) for sp in shards.splits.values() for i in range(len(sp.urls))]
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(heads)))) as pool:
        list(pool.map(lambda head: _check_head(shards, *head, decoder), heads))
        if verify:
            urls = list(entries)
            for url, digest in zip(urls, pool.map(sha256_file, urls), strict=True):
                if digest != entries[url]["sha256"]:
                    raise DataError(
                        f"sha256 mismatch: {url} is {digest[:12]}..., manifest says "
                        f"{str(entries[url]['sha256'])[:12]}...; the shard is damaged or changed, {fix}"
                    )
    return shards
