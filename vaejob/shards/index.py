"""Index existing WebDataset tars in place: ``python -m vaejob.shard --index DIR_OR_PATTERN [--out DIR]``.

The tars (img2dataset's or anyone's: ``KEY.jpg|png|webp`` with ``.cls`` / ``.txt`` / ``.json`` beside it,
images of any size) are read once and never rewritten. Each shard is hashed while it streams, every image
is decoded once (JPEG at 1/8 scale: the whole entropy stream is still read, so truncation shows), and the
result is a vaejob manifest (``format.build_manifest``) that points at the tars: per shard its sample count,
bytes, sha256, the image extensions and, where a split holds only some of its samples, their positions.
Samples that are not usable images are listed in ``skipped`` with the reason and belong to no split.
The manifest depends only on the tars and the split flags, never on ``--workers``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import posixpath
import re
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import IO, Any

import braceexpand
import numpy as np
from PIL import Image
from tqdm import tqdm

from vaejob import storage
from vaejob.cli import UsageError, error_line
from vaejob.shards.codec import to_mode
from vaejob.shards.format import IMAGE_EXTS, MANIFEST, DataError, build_manifest
from vaejob.shards.plan import DEFAULT_VAL_FRACTION, in_val
from vaejob.shards.tar import CHUNK, TarStream, iter_samples

WIDS_KIND = "wids-shard-index-v1"
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_WANTED = frozenset((*IMAGE_EXTS, "cls"))


# ------------------------------------------------------------------------------------------- the shards
def expand(spec: str) -> list[str]:
    """The tars a spec names: a directory (its ``*.tar``, sorted), a brace pattern or single tar (local
    or fsspec URL), or webdataset's ``wids`` shard index JSON (urls relative to the JSON)."""
    spec = spec.strip()
    if spec.endswith(".json"):
        return _wids(spec)
    if "{" in spec or spec.endswith(".tar"):
        return list(braceexpand.braceexpand(spec))
    root = spec.rstrip("/") or spec
    if not storage.is_url(root) and not os.path.isdir(root):
        raise UsageError(f"--index {spec}: no such directory; pass the directory of your shards or a pattern")
    names = sorted(n for n, size in storage.listdir(root).items() if size is not None and n.endswith(".tar"))
    found = [storage.join(root, n) for n in names]
    if not found:
        raise UsageError(
            f"--index {spec}: no .tar files in it; pass the directory of your shards or a pattern"
        )
    return found


def _wids(path: str) -> list[str]:
    try:
        index = storage.read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--index {path}: cannot read the wids index ({error_line(e)})") from None
    if not isinstance(index, dict) or index.get("__kind__") != WIDS_KIND:
        kind = index.get("__kind__") if isinstance(index, dict) else type(index).__name__
        raise UsageError(f"--index {path}: not a {WIDS_KIND} JSON (__kind__ is {kind!r})")
    base = storage.dirname(path)
    try:
        urls = [str(s["url"]) for s in index["shardlist"]]
    except (KeyError, TypeError) as e:
        raise UsageError(f"--index {path}: malformed shardlist ({error_line(e)})") from None
    return [u if storage.is_url(u) or u.startswith("/") else storage.join(base, u) for u in urls]


def relative_name(url: str, out: str) -> str:
    """How the manifest in ``out`` names ``url``: a path below ``out`` relative to it, else as it is
    (absolute local paths are made absolute)."""
    if storage.is_url(url) != storage.is_url(out):
        return url if storage.is_url(url) else os.path.abspath(storage.local_path(url))
    if storage.is_url(url):
        prefix = out.rstrip("/") + "/"
        return url[len(prefix) :] if url.startswith(prefix) else url
    path, root = os.path.abspath(storage.local_path(url)), os.path.abspath(storage.local_path(out))
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


# ------------------------------------------------------------------------------------------- scanning
class _Hashing:
    """A read-only stream that hashes what passes through (the tar is read once)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def seekable(self) -> bool:
        return False

    def readinto(self, target: memoryview) -> int:
        data = self.f.read(len(target))
        target[: len(data)] = data
        self.sha.update(data)
        self.bytes += len(data)
        return len(data)

    def drain(self) -> None:
        while data := self.f.read(CHUNK):
            self.sha.update(data)
            self.bytes += len(data)


def check_image(data: bytes) -> tuple[int, int, str]:
    """(width, height, mode) of an image member that decodes whole and converts to L / RGB; raises
    ``ValueError`` / ``OSError`` with the reason otherwise."""
    with Image.open(io.BytesIO(data)) as im:
        w, h, mode = im.width, im.height, im.mode
        if im.format == "JPEG":  # 1/8 scale: the entropy stream is still decoded to its end
            im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
        im.load()
        to_mode(im, 1 if mode in GREY_MODES else 3).load()
    return w, h, mode


def scan_shard(url: str) -> dict[str, Any]:
    """One tar: bytes, sha256, sample count, and per sample its key, image facts and label, or why not."""
    good: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    total = 0
    try:
        with storage.open_read(url) as raw:
            f = _Hashing(raw)
            for index, (key, members) in enumerate(
                iter_samples(TarStream(f, url), url, 0, None, None, _WANTED)
            ):
                total = index + 1
                where = key
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                if ext is None:
                    skipped.append({"path": where, "reason": f"no image member ({'/'.join(IMAGE_EXTS)})"})
                    continue
                try:
                    w, h, mode = check_image(members[ext])
                except Image.UnidentifiedImageError:
                    skipped.append(
                        {"path": where, "reason": f"{key}.{ext}: not an image (no decoder knows it)"}
                    )
                    continue
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    reason = re.sub(r" at 0x[0-9a-f]+", "", error_line(e))  # no addresses: deterministic
                    skipped.append({"path": where, "reason": f"{key}.{ext}: {reason}"})
                    continue
                label = None
                if "cls" in members:
                    try:
                        label = int(members["cls"].decode("utf-8").strip())
                        if label < 0:
                            raise ValueError(f"negative class {label}")
                    except (UnicodeDecodeError, ValueError) as e:
                        skipped.append({"path": where, "reason": f"{key}.cls is not a class index ({e})"})
                        continue
                good.append(
                    {"index": index, "key": key, "w": w, "h": h, "mode": mode, "ext": ext, "label": label}
                )
            f.drain()
    except DataError as e:  # a damaged tar: one line naming it, before anything is written
        raise DataError(f"cannot index {url}: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {url}: {error_line(e)}") from None
    return {
        "url": url,
        "bytes": f.bytes,
        "sha256": f.sha.hexdigest(),
        "total": total,
        "good": good,
        "skipped": skipped,
    }


def scan(urls: list[str], workers: int) -> list[dict[str, Any]]:
    """Every shard, in the order given, over ``workers`` processes."""
    bar = tqdm(total=len(urls), unit="shard", desc="vaejob.shard --index", dynamic_ncols=True)
    try:
        if workers <= 1 or len(urls) == 1:
            results = []
            for url in urls:
                results.append(scan_shard(url))
                bar.update(1)
            return results
        with ProcessPoolExecutor(min(workers, len(urls))) as ex:
            results = []
            for r in ex.map(scan_shard, urls):
                results.append(r)
                bar.update(1)
            return results
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------- manifest
def _quantiles(values: list[int]) -> dict[str, int]:
    q = np.percentile(np.asarray(values), [0, 10, 50, 90, 100], method="lower") if values else [0] * 5
    return dict(zip(("min", "p10", "p50", "p90", "max"), (int(v) for v in q), strict=True))


def image_stats(good: list[dict[str, Any]]) -> dict[str, Any]:
    """What the images are like: how many, their extensions, modes, sizes (to choose data.image_size)."""
    modes = Counter(g["mode"] for g in good)
    return {
        "count": len(good),
        "exts": dict(sorted(Counter(g["ext"] for g in good).items())),
        "modes": dict(sorted(modes.items())),
        "channels": 1 if modes and all(m in GREY_MODES for m in modes) else 3,
        "width": _quantiles([g["w"] for g in good]),
        "height": _quantiles([g["h"] for g in good]),
        "shorter_side": _quantiles([min(g["w"], g["h"]) for g in good]),
    }


def build_index(
    results: list[dict[str, Any]],
    out: str,
    spec: str,
    val_fraction: float | None,
    val_shards: str | None,
    train_only: bool = False,
) -> dict[str, Any]:
    """The manifest of the scanned shards, split by named shards or by key hash; an empty val split is
    refused unless ``train_only`` asks for one."""
    patterns = [p for part in (val_shards or "").split(",") if part for p in braceexpand.braceexpand(part)]
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None and not patterns else (val_fraction or 0.0)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for r in results:
        base = posixpath.basename(r["url"])
        named_val = any(fnmatch.fnmatchcase(base, p) for p in patterns)
        by_split: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        for g in r["good"]:
            val = named_val if patterns else in_val(g["key"], fraction)
            by_split["val" if val else "train"].append(g)
        for split, samples in by_split.items():
            if not samples:
                continue
            entry = {
                "name": relative_name(r["url"], out),
                "count": len(samples),
                "bytes": r["bytes"],
                "sha256": r["sha256"],
                "total": r["total"],
                "exts": sorted({g["ext"] for g in samples}),
            }
            if len(samples) != r["total"]:
                entry["samples"] = [g["index"] for g in samples]
            splits[split].append(entry)
    good = [g for r in results for g in r["good"]]
    if not splits["train"]:
        first = next(((r["url"], s) for r in results for s in r["skipped"]), None)
        why = f" (first skipped: {first[0]}#{first[1]['path']}: {first[1]['reason']})" if first else ""
        raise UsageError(
            f"--index {spec}: no usable train image among {sum(r['total'] for r in results)} samples{why}; "
            "check the tars, or lower --val-fraction / change --val-shards"
        )
    if not splits["val"] and not train_only:
        _refuse_empty_val(results, spec, val_fraction, fraction, val_shards, len(good))
    stats = image_stats(good)
    shapes = {(1 if g["mode"] in GREY_MODES else 3, g["h"], g["w"]) for g in good}
    channel_sets = {c for c, _, _ in shapes}
    hw = {(h, w) for _, h, w in shapes}
    common = (stats["channels"], *next(iter(hw))) if len(hw) == 1 and channel_sets else None
    labels = [g["label"] for g in good if g["label"] is not None]
    names = [str(i) for i in range(max(labels) + 1)] if labels else None
    return build_manifest(
        source=f"index:{spec}",
        seed=0,
        encoding="image",
        image_shape=common,
        splits=splits,
        args={"index": spec, "val_fraction": None if patterns else fraction, "val_shards": val_shards},
        label_names=names,
        skipped=[
            {"path": f"{relative_name(r['url'], out)}#{s['path']}", "reason": s["reason"]}
            for r in results
            for s in r["skipped"]
        ],
        extra={"images": stats},
    )


def _refuse_empty_val(
    results: list[dict[str, Any]],
    spec: str,
    val_fraction: float | None,
    fraction: float,
    val_shards: str | None,
    n_good: int,
) -> None:
    """vaejob.train and vaejob.evaluate need val images: say which flag left none and how to get some."""
    if val_shards:
        example = posixpath.basename(results[-1]["url"])
        raise UsageError(
            f"--index {spec}: the val split would be empty: --val-shards {val_shards!r} names no tar with a "
            f"usable image; pass patterns of the val tars' base names (such as {example!r})"
        )
    given = "" if val_fraction is not None else " (the default)"
    raise UsageError(
        f"--index {spec}: the val split would be empty: --val-fraction {fraction:g}{given} puts none of the "
        f"{n_good} usable images in val; raise --val-fraction or pass --val-shards PATTERNS, or --train-only "
        "for a set without val (vaejob.train and vaejob.evaluate refuse it)"
    )


def check_index_out(out: str, overwrite: bool) -> None:
    """Refuse, before scanning, a place the manifest cannot go: say to pass --out."""
    mpath = storage.join(out, MANIFEST)
    if storage.is_url(out):
        if storage.exists(mpath) and not overwrite:
            raise UsageError(f"{mpath} exists: pass --overwrite to replace it, or choose another --out")
        return
    parent = os.path.abspath(storage.local_path(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not _can_create_in(parent):
        raise UsageError(
            f"cannot write {mpath} ({parent} is read-only or not a directory); "
            "pass --out DIR to put the index elsewhere (it names the tars where they are)"
        )
    if os.path.exists(mpath) and not overwrite:
        raise UsageError(f"{mpath} exists: pass --overwrite to replace it, or choose another --out")


def _can_create_in(folder: str) -> bool:
    """Try it: permission bits say nothing to root, and nothing about a read-only mount."""
    if not os.path.isdir(folder):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def default_out(urls: list[str], spec: str) -> str:
    dirs = {storage.dirname(u) for u in urls}
    if len(dirs) != 1:
        raise UsageError(
            f"--index {spec}: the tars are in {len(dirs)} directories; pass --out DIR for the index"
        )
    return dirs.pop()
