"""The shard-set format (docs/CONTRACTS.md): file names, the manifest's one builder, and its parser.

A shard set is a directory (or URL prefix) of ustar shards ``<split>-NNNNNN.tar`` plus ``manifest.json``,
written last: its presence means the set is complete. Both writers (``vaejob.shard``, ``vaejob.sample``)
build the manifest with ``build_manifest``; every reader goes through ``parse_manifest``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vaejob import __version__, storage
from vaejob.cli import UserError

FORMAT = "vaejob-shards/1"
ENCODINGS = ("npy", "png", "jpg")
MANIFEST = "manifest.json"
PARTS = "parts"  # per-shard or per-task records of a set being written (job arrays, vaejob.sample)
SHARD_ENTRY_FIELDS = ("name", "count", "bytes", "sha256")
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # PIL image mode of each supported channel count
SHARD_CMD = "python -m vaejob.shard --source ... --out"
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
    image_shape: tuple[int, int, int],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    args: Mapping[str, Any],
    label_names: Sequence[str] | None = None,
    factor_names: Sequence[str] | None = None,
    skipped: Sequence[Mapping[str, str]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a set whose shards are written: ``splits`` maps a split to its shard records in
    order (each with at least name, count, bytes, sha256); ``extra`` adds writer-specific fields."""
    c, h, w = image_shape
    manifest = {
        "format": FORMAT,
        "vaejob_version": __version__,
        "source": source,
        "seed": seed,
        "encoding": encoding,
        "image": {"height": h, "width": w, "channels": c},
        "labels": {"num_classes": len(label_names), "names": list(label_names)}
        if label_names is not None
        else None,
        "factors": list(factor_names) if factor_names is not None else None,
        "splits": {
            name: {
                "count": sum(int(r["count"]) for r in records),
                "shards": [{k: r[k] for k in SHARD_ENTRY_FIELDS} for r in records],
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
                f"split {name!r} not in {storage.join(self.root, MANIFEST)} "
                f"(it has {sorted(self.splits)}); re-create the shard set with that split"
            )
        return self.splits[name]

    @property
    def label_names(self) -> list[str] | None:
        return (self.manifest.get("labels") or {}).get("names")

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every shard record of the manifest (name, count, bytes, sha256), all splits."""
        return [s for split in self.manifest["splits"].values() for s in split["shards"]]


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
        image = manifest["image"]
        shape = (int(image["channels"]), int(image["height"]), int(image["width"]))
        encoding = str(manifest["encoding"])
        labels = manifest.get("labels")
        num_classes = integer(labels["num_classes"], "labels.num_classes", 0) if labels else 0
        splits: dict[str, SplitShards] = {}
        for name, split in manifest["splits"].items():
            shards = split["shards"]
            counts = []
            for k, s in enumerate(shards):
                if not _SHARD_FILE.match(str(s["name"])):
                    raise DataError(f"{mpath}: bad shard name {s['name']!r}; {fix}")
                where = f"splits.{name}.shards[{k}]"
                integer(s["bytes"], f"{where}.bytes", 0)
                counts.append(integer(s["count"], f"{where}.count", 1, " (no writer lists an empty shard)"))
            if sum(counts) != integer(split["count"], f"splits.{name}.count", 0):
                raise DataError(
                    f"{mpath}: split {name!r} count {split['count']} != sum of its shard counts "
                    f"{sum(counts)} (manifest edited or damaged); {fix}"
                )
            splits[name] = SplitShards(tuple(storage.join(root, s["name"]) for s in shards), tuple(counts))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{mpath}: malformed manifest ({type(e).__name__}: {e}); {fix}") from None
    if encoding not in ENCODINGS or shape[0] not in CHANNEL_MODES or min(shape) < 1:
        raise DataError(f"{mpath}: unsupported encoding {encoding!r} or image shape {shape}; {fix}")
    return ShardSet(root, manifest, splits, shape, num_classes, encoding)
