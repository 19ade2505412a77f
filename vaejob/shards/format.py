"""The shard-set format (docs/CONTRACTS.md): file names, the manifest's one builder, and its parser.

A shard set is a directory (or URL prefix) of ustar shards ``<split>-NNNNNN.tar`` plus ``manifest.json``,
written last: its presence means the set is complete. Every writer (``vaejob.shard``, ``vaejob.shard
--index``, ``vaejob.sample``) builds the manifest with ``build_manifest``; every reader goes through
``parse_manifest``.

An indexed set (``vaejob.shard --index``) is a shard set whose shards are someone else's tars: its shard
names may be paths relative to the manifest or absolute paths / URLs, its encoding is ``image`` (each
sample's jpg / png / webp member, decoded by its extension), ``image`` is null when the images do not share
one shape, and a shard entry lists the tar's ``total`` samples and, when the split holds only some of them,
their positions (``samples``). Readers then need a target size (``with_target``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from vaejob import __version__, storage
from vaejob.cli import UserError

FORMAT = "vaejob-shards/1"
ENCODINGS = ("npy", "png", "jpg", "image")  # image: indexed foreign tars, decoded by member extension
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members of foreign tars, in order of preference
RESIZE_MODES = ("center_crop", "resize", "pad")
MANIFEST = "manifest.json"
PARTS = "parts"  # per-shard or per-task records of a set being written (job arrays, vaejob.sample)
SHARD_ENTRY_FIELDS = ("name", "count", "bytes", "sha256")
INDEX_ENTRY_FIELDS = ("total", "samples", "exts")  # indexed shards only (see the module docstring)
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # PIL image mode of each supported channel count
SHARD_CMD = "python -m vaejob.shard --source ... --out"
INDEX_CMD = "python -m vaejob.shard --index"
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.tar$")


class DataError(UserError):
    """A shard set cannot be used; the message is one line naming the file and the fix."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def build_manifest(
    *,
    source: str,
    seed: int,
    encoding: str,
    image_shape: tuple[int, int, int] | None,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    args: Mapping[str, Any],
    label_names: Sequence[str] | None = None,
    factor_names: Sequence[str] | None = None,
    skipped: Sequence[Mapping[str, str]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a set whose shards are written: ``splits`` maps a split to its shard records in
    order (each with at least name, count, bytes, sha256, and for indexed shards total, samples, exts);
    ``image_shape`` is None when the images have no single shape; ``extra`` adds writer-specific fields."""
    keep = SHARD_ENTRY_FIELDS + INDEX_ENTRY_FIELDS
    manifest = {
        "format": FORMAT,
        "vaejob_version": __version__,
        "source": source,
        "seed": seed,
        "encoding": encoding,
        "image": None
        if image_shape is None
        else {"height": image_shape[1], "width": image_shape[2], "channels": image_shape[0]},
        "labels": {"num_classes": len(label_names), "names": list(label_names)}
        if label_names is not None
        else None,
        "factors": list(factor_names) if factor_names is not None else None,
        "splits": {
            name: {
                "count": sum(int(r["count"]) for r in records),
                "shards": [{k: r[k] for k in keep if k in r} for r in records],
            }
            for name, records in splits.items()
        },
        "skipped": sorted((dict(s) for s in skipped), key=lambda s: (s["path"], s["reason"])),
        "args": dict(args),
    }
    manifest.update(extra or {})
    return manifest


def write_manifest(root: str, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` last and atomically: the shard renames are made durable first."""
    storage.fsync_dir(root)
    storage.atomic_write_json(storage.join(root, MANIFEST), manifest)


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split, in manifest order. ``counts`` are this split's samples per shard. For an
    indexed shard that the split shares with another (or whose bad samples were left out), ``picks[i]``
    holds the positions in the tar of those samples and ``totals[i]`` the tar's sample count; else both
    are None / the count (every sample of the tar, in order)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    picks: tuple[tuple[int, ...] | None, ...] = ()
    totals: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return sum(self.counts)

    def pick(self, i: int) -> tuple[int, ...] | None:
        return self.picks[i] if self.picks else None

    def total(self, i: int) -> int:
        return self.totals[i] if self.totals else self.counts[i]


@dataclass(frozen=True)
class ShardSet:
    """A validated shard set. ``num_classes`` is 0 when the source has no labels. ``image_shape`` is what
    the loader yields (C, H, W); ``native_shape`` what the manifest says every image is (None: images of
    many shapes); they differ when a target size or channel count was asked for (``with_target``), and then
    images are brought to ``image_shape`` by ``resize``."""

    root: str
    manifest: dict[str, Any]
    splits: dict[str, SplitShards]
    image_shape: tuple[int, int, int]  # (C, H, W); H = W = 0 until with_target when native_shape is None
    num_classes: int
    encoding: str
    native_shape: tuple[int, int, int] | None = None
    resize: str = "center_crop"

    def split(self, name: str) -> SplitShards:
        if name not in self.splits:
            raise DataError(
                f"split {name!r} not in {storage.join(self.root, MANIFEST)} "
                f"(it has {sorted(self.splits)}); re-create the shard set with that split"
            )
        return self.splits[name]

    @property
    def label_names(self) -> list[str] | None:
        return (self.manifest.get("labels") or {}).get("names")

    @property
    def indexed(self) -> bool:
        """Foreign tars indexed in place: a bad image is skipped and counted, not fatal."""
        return self.encoding == "image"

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every shard record of the manifest (name, count, bytes, sha256, ...), all splits."""
        return [s for split in self.manifest["splits"].values() for s in split["shards"]]

    def url_of(self, name: str) -> str:
        return shard_url(self.root, name)

    def with_target(self, image_size: int = 0, channels: int = 0, resize: str = "center_crop") -> ShardSet:
        """The set as the loader should yield it: ``image_size`` x ``image_size`` (0: the set's own size),
        ``channels`` 1 or 3 (0: the set's own), reached by ``resize``. Raises ``DataError`` when the images
        have no single shape and no size is given."""
        c, h, w = self.native_shape or self.image_shape
        if image_size:
            h = w = image_size
        elif self.native_shape is None:
            raise DataError(
                f"the images of {self.root} have many sizes ({_size_range(self.manifest)}): set "
                "data.image_size (e.g. data.image_size=64) and data.resize (center_crop|resize|pad)"
            )
        shape = (channels or c, h, w)
        return replace(self, image_shape=shape, resize=resize)


def _size_range(manifest: Mapping[str, Any]) -> str:
    sizes = (manifest.get("images") or {}).get("shorter_side") or {}
    if "min" in sizes and "max" in sizes:
        return f"shorter side {sizes['min']} to {sizes['max']} px"
    return "see images in manifest.json"


def shard_url(root: str, name: str) -> str:
    """Where a manifest's shard ``name`` lives: absolute paths and URLs as they are, else beside it."""
    if storage.is_url(name) or name.startswith(("/", "file://")):
        return name
    return storage.join(root, name)


def _name_ok(name: str) -> bool:
    """A shard name: vaejob's own ``<split>-NNNNNN.tar``, or (indexed sets) a relative path that stays
    below the manifest's directory, an absolute path or a URL."""
    if _SHARD_FILE.match(name):
        return True
    if storage.is_url(name) or name.startswith(("/", "file://")):
        return name.endswith(".tar") or "://" in name
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts) and _SHARD_FILE.match(parts[-1]) is not None


def parse_manifest(root: str, manifest: Any) -> ShardSet:
    """Check a loaded ``manifest.json`` (no I/O); raise ``DataError`` naming the problem and the fix."""
    mpath = storage.join(root, MANIFEST)
    fix = f"re-create the shard set with {SHARD_CMD} {root}"

    def integer(value: Any, where: str, minimum: int, why: str = "") -> int:
        # JSON integers only (int() takes "12", 12.7 and true), bounded: a negative count or size would
        # pass every later check while the sums still add up.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DataError(f"{mpath}: {where} is {value!r}, expected an integer >= {minimum}{why}; {fix}")
        return value

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{mpath}: unknown manifest format {fmt!r} (this vaejob reads {FORMAT!r}); {fix}")
    try:
        encoding = str(manifest["encoding"])
        image = manifest["image"]
        if image is None and encoding == "image":  # indexed images of many shapes: a target is needed
            native = None
            shape = (int((manifest.get("images") or {}).get("channels", 3)), 0, 0)
        else:
            native = shape = (int(image["channels"]), int(image["height"]), int(image["width"]))
        labels = manifest.get("labels")
        num_classes = integer(labels["num_classes"], "labels.num_classes", 0) if labels else 0
        splits: dict[str, SplitShards] = {}
        for name, split in manifest["splits"].items():
            shards = split["shards"]
            counts, picks, totals = [], [], []
            for k, s in enumerate(shards):
                if not isinstance(s["name"], str) or not _name_ok(s["name"]):
                    raise DataError(f"{mpath}: bad shard name {s['name']!r}; {fix}")
                where = f"splits.{name}.shards[{k}]"
                integer(s["bytes"], f"{where}.bytes", 0)
                count = integer(s["count"], f"{where}.count", 1, " (no writer lists an empty shard)")
                total = integer(s.get("total", count), f"{where}.total", count)
                chosen = s.get("samples")
                if chosen is not None:
                    chosen = tuple(integer(i, f"{where}.samples[]", 0) for i in chosen)
                    if (
                        len(chosen) != count
                        or any(b <= a for a, b in zip(chosen, chosen[1:], strict=False))
                        or (chosen and chosen[-1] >= total)
                    ):
                        raise DataError(
                            f"{mpath}: {where}.samples must be {count} increasing positions below {total}; {fix}"
                        )
                elif total != count:
                    raise DataError(
                        f"{mpath}: {where} has total {total} != count {count} without samples; {fix}"
                    )
                counts.append(count)
                picks.append(chosen)
                totals.append(total)
            if sum(counts) != integer(split["count"], f"splits.{name}.count", 0):
                raise DataError(
                    f"{mpath}: split {name!r} count {split['count']} != sum of its shard counts "
                    f"{sum(counts)} (manifest edited or damaged); {fix}"
                )
            any_picks = any(p is not None for p in picks)
            splits[name] = SplitShards(
                tuple(shard_url(root, s["name"]) for s in shards),
                tuple(counts),
                tuple(picks) if any_picks else (),
                tuple(totals) if any_picks else (),
            )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{mpath}: malformed manifest ({type(e).__name__}: {e}); {fix}") from None
    if encoding not in ENCODINGS or shape[0] not in CHANNEL_MODES or (native and min(native) < 1):
        raise DataError(f"{mpath}: unsupported encoding {encoding!r} or image shape {shape}; {fix}")
    return ShardSet(root, manifest, splits, shape, num_classes, encoding, native)
