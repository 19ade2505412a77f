"""Open a shard set and check it before any training starts: ``open_shards``.

Checks: the manifest is present and well-formed, every shard exists with the manifest's byte size (one
listing request on object stores), the first sample of every shard parses with the manifest's image shape,
and (``verify``) every shard's sha256. Anything wrong is a ``DataError`` of one line naming the file.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import braceexpand
import fsspec

from vaejob import storage
from vaejob.shards.codec import Decoder
from vaejob.shards.format import MANIFEST, SHARD_CMD, DataError, ShardSet, parse_manifest
from vaejob.shards.tar import CHUNK, TarStream, iter_samples


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
        try:
            sizes[name] = storage.size(storage.join(root, name))
        except OSError:
            pass
    return sizes


def _check_head(url: str, decoder: Decoder) -> None:
    """The first sample of a shard: catches corrupt headers and shape/encoding mismatches up front."""
    with storage.open_read(url) as f:
        key, members = next(iter_samples(TarStream(f, url, chunk=8192), url, 0, 1, None, decoder.wanted))
    decoder.image(url, key, members)


def open_shards(spec: str | ShardSet, verify: bool = False) -> ShardSet:
    """Open and validate a shard set.

    ``spec`` is a shard-set directory / URL prefix holding ``manifest.json``, the manifest itself, or a
    brace pattern / single shard path (``s3://b/fmnist/train-{000000..000099}.tar``) that must name exactly
    the shards of one split. Raises ``DataError`` with a one-line message.
    """
    if isinstance(spec, ShardSet):
        return spec
    root, selected = resolve_spec(spec)
    mpath = storage.join(root, MANIFEST)
    if not storage.exists(mpath):
        raise DataError(f"not a shard set: {mpath} not found; create one with {SHARD_CMD} {root}")
    try:
        manifest = storage.read_json(mpath)
    except (OSError, ValueError) as e:
        raise DataError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e}); re-copy it") from None
    shards = parse_manifest(root, manifest)

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

    entries = shards.entries
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

    decoder = Decoder(shards.encoding, shards.image_shape)
    heads = [u for sp in shards.splits.values() for u, c in zip(sp.urls, sp.counts, strict=True) if c > 0]
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(heads)))) as pool:
        list(pool.map(lambda url: _check_head(url, decoder), heads))
        if verify:
            urls = [storage.join(root, n) for n in names]
            for s, url, digest in zip(entries, urls, pool.map(sha256_file, urls), strict=True):
                if digest != s["sha256"]:
                    raise DataError(
                        f"sha256 mismatch: {url} is {digest[:12]}..., manifest says {str(s['sha256'])[:12]}...; "
                        "the shard is damaged, re-copy it or re-create the shard set"
                    )
    return shards
