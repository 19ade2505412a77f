"""Write a WebDataset shard set (docs/CONTRACTS.md) from an image source: ``python -m vaejob.shard``.

Each shard is one task for a worker process: written to ``NAME.tmp``, fsynced, renamed. ``manifest.json`` is
written last, so its presence means the set is complete. The bytes depend on the source, the seed and the
byte-shaping flags only, never on ``--workers`` or ``--num-tasks``: split membership is a hash of the key,
order within a split is a seeded hash, and shard ``i`` always holds the ordered samples ``[i*S, (i+1)*S)``
(minus any unreadable ones).

Job arrays: ``--task-index I --num-tasks T`` writes the shards whose ordinal (train then val) is ``I mod T``
plus ``parts/part-I.json``; ``--finalize`` then merges the parts into the same manifest a single run writes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vaejob import __version__, storage
from vaejob.sources import SPEC_HELP, Source, SourceError, fit, open_source, source_name

FORMAT = "vaejob-shards/1"
PART_FORMAT = "vaejob-shard-part/1"
SPLITS = ("train", "val")
ENCODINGS = ("npy", "png", "jpg")
DEFAULT_VAL_FRACTION = 0.1
MANIFEST = "manifest.json"
PARTS = "parts"
_SHARD_RE = re.compile(r"(train|val)-\d{6}\.tar")
_PART_RE = re.compile(r"part-\d+\.json")


class UsageError(Exception):
    """Bad flags or output directory; the message is one line naming the thing and the fix."""


@dataclass(frozen=True)
class Settings:
    """The arguments that shape the bytes of a shard set (stored as the manifest's ``args``)."""

    source: str
    size: int
    channels: int
    val_fraction: float | None  # None: the source's official train/test split
    shard_size: int
    seed: int
    limit: int | None
    format: str
    jpeg_quality: int


# --------------------------------------------------------------------------------------------- planning


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def in_val(key: str, fraction: float) -> bool:
    """Split membership by key alone (no seed), so it is stable across re-shardings."""
    return _hash64(key) / 2**64 < fraction


def order_key(seed: int, key: str) -> bytes:
    """Sort key of a sample within its split: a seeded shuffle that mixes class-sorted sources."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def _limit(source: Source, limit: int | None) -> list[int]:
    n = len(source.keys)
    if limit is None or limit >= n:
        return list(range(n))
    if source.official is None:
        return list(range(limit))
    # Keep both official splits, in proportion, so a --limit subset still has a test split.
    by_split = {s: [i for i, o in enumerate(source.official) if o == s] for s in SPLITS}
    k_train = min(len(by_split["train"]), round(limit * len(by_split["train"]) / n))
    k_val = min(len(by_split["val"]), limit - k_train)
    return sorted(by_split["train"][:k_train] + by_split["val"][:k_val])


def plan_splits(
    source: Source, val_fraction: float | None, seed: int, limit: int | None
) -> dict[str, list[int]]:
    """Sample indices of each split, in shard order."""
    chosen = _limit(source, limit)
    if val_fraction is None and source.official is not None:
        splits = {s: [i for i in chosen if source.official[i] == s] for s in SPLITS}
    else:
        f = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        val = {i for i in chosen if in_val(source.keys[i], f)}
        splits = {"train": [i for i in chosen if i not in val], "val": [i for i in chosen if i in val]}
    for idx in splits.values():
        idx.sort(key=lambda i: order_key(seed, source.keys[i]))
    return splits


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def plan_shards(splits: dict[str, list[int]], shard_size: int) -> list[tuple[str, int, list[int]]]:
    """All shard tasks ``(split, index, sample indices)``, train first; a task's ordinal is its position."""
    tasks = []
    for split in SPLITS:
        idx = splits[split]
        for k, start in enumerate(range(0, len(idx), shard_size)):
            tasks.append((split, k, idx[start : start + shard_size]))
    return tasks


# --------------------------------------------------------------------------------------------- writing


def encode_image(arr: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """Bytes of an H×W×C uint8 image: ``npy`` (np.save v1.0, zero decode cost), ``png`` or ``jpg``."""
    if encoding == "npy":
        return _npy_header(arr.shape) + np.ascontiguousarray(arr).tobytes()
    buf = io.BytesIO()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if encoding == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """What ``np.save`` writes before the data of a uint8 array of ``shape`` (saves ~20 µs per image)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, np.uint8), allow_pickle=False)
    return buf.getvalue()[: -math.prod(shape)]


def tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header with fixed fields (mode 0644, uid/gid 0, mtime 0, no user names).

    Byte-identical to ``tarfile`` with ``USTAR_FORMAT`` and those fields (tested), but ~10× cheaper: tarfile's
    per-member overhead alone would cap a writer process near 4k samples/s.
    """
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    head = b"".join(
        [
            raw.ljust(100, b"\0"),
            b"0000644\0",  # mode
            b"0000000\0",  # uid
            b"0000000\0",  # gid
            b"%011o\0" % size,
            b"00000000000\0",  # mtime
            b" " * 8,  # checksum placeholder: counts as spaces while summing
            b"0",  # regular file
            b"\0" * 100,  # link name
            b"ustar\x0000",
            b"\0" * 80,  # user and group names, device numbers (empty for regular files)
            b"\0" * 167,  # prefix and padding
        ]
    )
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


class TarWriter:
    """Streams members into a ustar archive while hashing and counting, so shards are never read back."""

    BLOCK, RECORD = 512, 10240

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.pos += len(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(tar_header(name, len(data)) + data + b"\0" * (-len(data) % self.BLOCK))

    def close(self) -> None:
        # Two zero blocks end the archive; tarfile then pads to a whole 10 KiB record, and so do we.
        end = 2 * self.BLOCK
        self._write(b"\0" * (end + (-(self.pos + end) % self.RECORD)))


# Worker-process state, set once per process by _init_worker (inherited on fork, pickled on spawn).
_W: dict[str, Any] = {}


class _ValueCounter:
    def __init__(self, value: Any) -> None:
        self.value = value

    def add(self, n: int) -> None:
        with self.value.get_lock():
            self.value.value += n


class _BarCounter:
    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def add(self, n: int) -> None:
        self.bar.update(n)


def _init_worker(source: Source, settings: Settings, out: str, counter: Any) -> None:
    _W.update(
        source=source,
        settings=settings,
        out=out,
        counter=counter if isinstance(counter, _BarCounter) else _ValueCounter(counter),
    )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _write_shard(task: tuple[str, int, list[int]]) -> dict[str, Any]:
    """Write one shard; unreadable samples are skipped and reported, never fatal."""
    split, index, indices = task
    source: Source = _W["source"]
    st: Settings = _W["settings"]
    counter = _W["counter"]
    name = shard_name(split, index)
    path = os.path.join(_W["out"], name)
    skipped: list[dict[str, str]] = []
    count = pending = 0
    with open(path + ".tmp", "wb") as f:
        tar = TarWriter(f)
        for i in indices:
            try:
                arr, label, factors = source.load(i)
                data = encode_image(fit(arr, st.size, st.channels), st.format, st.jpeg_quality)
            except Exception as e:
                skipped.append({"path": source.where(i), "reason": _one_line(e)})
            else:
                key = source.keys[i]
                tar.add(f"{key}.{st.format}", data)
                if label is not None:
                    tar.add(f"{key}.cls", str(label).encode("ascii"))
                if factors is not None:
                    tar.add(f"{key}.json", json.dumps(factors, sort_keys=True).encode("utf-8"))
                count += 1
            pending += 1
            if pending == 32:  # batch the shared-counter updates (each takes a lock)
                counter.add(pending)
                pending = 0
        tar.close()
        f.flush()
        os.fsync(f.fileno())
    counter.add(pending)
    if count == 0:  # every sample unreadable: no empty shard in the set
        os.unlink(path + ".tmp")
    else:
        os.replace(path + ".tmp", path)
    return {
        "split": split,
        "index": index,
        "name": name,
        "count": count,
        "bytes": tar.pos,
        "sha256": tar.sha.hexdigest(),
        "skipped": skipped,
    }


def write_shards(
    source: Source, settings: Settings, out: str, tasks: list[tuple[str, int, list[int]]], workers: int
) -> list[dict[str, Any]]:
    """Write ``tasks`` into ``out`` with worker processes; results in task order. Leaves no ``.tmp`` on error.

    A process pool executor rather than ``multiprocessing.Pool``: a worker killed mid-shard (out of memory,
    a crash in an image decoder) fails the run with ``BrokenProcessPool`` instead of hanging it forever.
    """
    total = sum(len(t[2]) for t in tasks)
    bar = tqdm(total=total, unit="img", unit_scale=True, desc="vaejob.shard", disable=None, smoothing=0.1)
    done = False
    try:
        if workers <= 1 or len(tasks) <= 1:
            _init_worker(source, settings, out, _BarCounter(bar))
            results = [_write_shard(t) for t in tasks]
        else:
            value = mp.Value("q", 0)
            initargs = (source, settings, out, value)
            with ProcessPoolExecutor(
                min(workers, len(tasks)), initializer=_init_worker, initargs=initargs
            ) as ex:
                futures = [ex.submit(_write_shard, t) for t in tasks]
                try:
                    pending = futures
                    while pending:  # poll the shared counter so the bar moves inside large shards
                        finished, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                        bar.update(value.value - bar.n)
                        if any(f.exception() is not None for f in finished):
                            break
                    results = [f.result() for f in futures]  # raises the first worker error
                except BaseException:
                    ex.shutdown(cancel_futures=True)
                    raise
            bar.update(total - bar.n)
        done = True
        return results
    finally:
        _W.clear()
        bar.close()
        if not done:
            for split, index, _ in tasks:
                tmp = os.path.join(out, shard_name(split, index) + ".tmp")
                if os.path.exists(tmp):
                    os.unlink(tmp)


# --------------------------------------------------------------------------------------------- manifest


def make_header(
    source: Source, settings: Settings, tasks: list[tuple[str, int, list[int]]]
) -> dict[str, Any]:
    """Everything the manifest needs besides the shard results (also carried by each job-array part)."""
    labels = source.label_names
    return {
        "format": FORMAT,
        "vaejob_version": __version__,
        "source": settings.source,
        "seed": settings.seed,
        "encoding": settings.format,
        "image": {"height": settings.size, "width": settings.size, "channels": settings.channels},
        "labels": {"num_classes": len(labels), "names": list(labels)} if labels is not None else None,
        "factors": list(source.factor_names) if source.factor_names is not None else None,
        "args": asdict(settings),
        "scan_skipped": list(source.scan_skipped),
        "planned": {s: [len(t[2]) for t in tasks if t[0] == s] for s in SPLITS},
    }


def build_manifest(header: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest from a header and shard results in any order (so parts merge to identical bytes)."""
    manifest = {k: v for k, v in header.items() if k not in ("scan_skipped", "planned")}
    splits = {}
    for split in SPLITS:
        mine = sorted(
            (r for r in results if r["split"] == split and r["count"] > 0), key=lambda r: r["index"]
        )
        splits[split] = {
            "count": sum(r["count"] for r in mine),
            "shards": [{k: r[k] for k in ("name", "count", "bytes", "sha256")} for r in mine],
        }
    manifest["splits"] = splits
    skipped = list(header["scan_skipped"]) + [s for r in results for s in r["skipped"]]
    manifest["skipped"] = sorted(skipped, key=lambda s: (s["path"], s["reason"]))
    return manifest


def write_manifest(out: str, manifest: dict[str, Any]) -> None:
    storage.fsync_dir(out)  # the shard renames are durable before the manifest says "complete"
    storage.atomic_write_json(os.path.join(out, MANIFEST), manifest)


def finalize(out: str) -> dict[str, Any]:
    """Merge ``parts/part-*.json`` of a job array into ``manifest.json``; raise `UsageError` if incomplete."""
    parts_dir = os.path.join(out, PARTS)
    first = os.path.join(parts_dir, "part-0.json")
    if not os.path.isfile(first):
        raise UsageError(f"--finalize: {first!r} not found: run every --task-index/--num-tasks task first")
    parts = [_read_part(first)]
    num_tasks = parts[0]["num_tasks"]
    for i in range(1, num_tasks):
        path = os.path.join(parts_dir, f"part-{i}.json")
        if not os.path.isfile(path):
            raise UsageError(
                f"--finalize: {path!r} not found: task {i} of {num_tasks} has not finished, re-run it"
            )
        part = _read_part(path)
        if part["header"] != parts[0]["header"] or part["num_tasks"] != num_tasks:
            raise UsageError(
                f"--finalize: {path!r} is from a different run than part-0.json: re-run task {i}"
            )
        parts.append(part)
    header = parts[0]["header"]
    results = [r for p in parts for r in p["shards"]]
    have = {(r["split"], r["index"]) for r in results}
    ordinal = 0
    for split in SPLITS:
        for index in range(len(header["planned"][split])):
            if (split, index) not in have:
                raise UsageError(
                    f"--finalize: no result for {shard_name(split, index)}: re-run task {ordinal % num_tasks}"
                )
            ordinal += 1
    manifest = build_manifest(header, results)
    names = set()
    for split in SPLITS:
        for s in manifest["splits"][split]["shards"]:
            path = os.path.join(out, s["name"])
            if not os.path.isfile(path) or os.path.getsize(path) != s["bytes"]:
                raise UsageError(
                    f"--finalize: {path!r} is missing or has the wrong size: re-run the task that wrote it"
                )
            names.add(s["name"])
    for entry in os.listdir(out):  # shards left over from an earlier run into the same directory
        if (_SHARD_RE.fullmatch(entry) and entry not in names) or entry.endswith(".tmp"):
            os.unlink(os.path.join(out, entry))
    write_manifest(out, manifest)
    shutil.rmtree(parts_dir)
    return manifest


def _read_part(path: str) -> dict[str, Any]:
    try:
        part = storage.read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--finalize: cannot read {path!r} ({_one_line(e)}): re-run that task") from None
    if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
        raise UsageError(
            f"--finalize: {path!r} is not a vaejob.shard part file: remove it and re-run that task"
        )
    return part


# --------------------------------------------------------------------------------------------- output dir


def _is_ours(out: str, entry: str) -> bool:
    path = os.path.join(out, entry)
    if entry == PARTS and os.path.isdir(path):
        return all(_PART_RE.fullmatch(e) or e.endswith(".tmp") for e in os.listdir(path))
    return os.path.isfile(path) and (
        entry == MANIFEST or entry.endswith(".tmp") or bool(_SHARD_RE.fullmatch(entry))
    )


def check_out_dir(out: str, overwrite: bool, task_mode: bool) -> None:
    """Refuse (before anything is written) an output directory we must not write into."""
    if storage.is_url(out):
        raise UsageError(
            f"--out {out!r}: sharding writes to a local directory; copy the finished set to storage afterwards"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a file, not a directory: choose another --out")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries:
        return
    foreign = [e for e in entries if not _is_ours(out, e)]
    if task_mode:
        # Other array tasks write into the same directory: only foreign files or a finished set stop us.
        if foreign:
            raise UsageError(
                f"--out {out!r} holds files vaejob.shard did not write ({foreign[0]!r}): choose an empty --out"
            )
        if MANIFEST in entries and not overwrite:
            raise UsageError(
                f"--out {out!r} already holds a complete shard set: pass --overwrite, or choose another --out"
            )
        return
    if not overwrite:
        raise UsageError(
            f"--out {out!r} is not empty: pass --overwrite to replace its shard set, or choose another --out"
        )
    if foreign:
        raise UsageError(
            f"--out {out!r} holds files vaejob.shard did not write ({foreign[0]!r}): refusing to --overwrite, "
            "choose another --out"
        )


def _clear_out(out: str, own: list[str] | None, task_index: int | None) -> None:
    """Remove the previous set (all of it, or only this array task's shards), manifest first."""
    manifest = os.path.join(out, MANIFEST)
    if os.path.exists(manifest):
        os.unlink(manifest)  # first: a half-removed set must never look complete
    if not os.path.isdir(out):
        return
    if own is None:
        for entry in os.listdir(out):
            if entry == PARTS:
                shutil.rmtree(os.path.join(out, entry))
            elif _SHARD_RE.fullmatch(entry) or entry.endswith(".tmp"):
                os.unlink(os.path.join(out, entry))
        return
    for path in [os.path.join(out, n) for n in own] + [os.path.join(out, PARTS, f"part-{task_index}.json")]:
        if os.path.exists(path):
            os.unlink(path)


# --------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line on stderr, exit 2 (handled in main)
        raise UsageError(f"{message} (see --help)")


def _int_type(minimum: int, maximum: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), e.g. 0.1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vaejob-shard",
        description="Write a WebDataset shard set (train-*.tar, val-*.tar, manifest.json) into a LOCAL directory.",
        epilog=(
            f"Sources: {SPEC_HELP}. fashion-mnist/mnist read the IDX files (.gz or not; defaults "
            "/usr/share/datasets/<name>); cifar10 reads the official python pickle batches (trusted files only). "
            "Without --val-fraction, datasets with an official test split use it as val; otherwise val "
            f"membership is a hash of the key (default fraction {DEFAULT_VAL_FRACTION}). "
            "Job arrays: run each task with --task-index I --num-tasks T, then once with --finalize --out DIR."
        ),
    )
    p.add_argument("--source", help=f"what to shard: {SPEC_HELP}")
    p.add_argument("--out", help="output directory (local; default shards/<source-name>)")
    p.add_argument(
        "--size", type=_int_type(1), help="output side in pixels (default: the source's native size)"
    )
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB); default: the source's")
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        help="val share in [0, 1) by key hash (default: official split, else 0.1)",
    )
    p.add_argument("--shard-size", type=_int_type(1), default=5000, help="samples per shard (default 5000)")
    p.add_argument(
        "--workers",
        type=_int_type(1),
        default=min(8, os.cpu_count() or 1),
        help="writer processes (default min(8, CPUs))",
    )
    p.add_argument(
        "--seed", type=_int_type(0), default=0, help="order within splits; synthetic content (default 0)"
    )
    p.add_argument(
        "--limit", type=_int_type(1), help="keep only the first N samples (official splits: in proportion)"
    )
    p.add_argument(
        "--format",
        choices=ENCODINGS,
        default="npy",
        help="image encoding (default npy: raw uint8, no decode cost)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=_int_type(1, 100),
        default=95,
        help="JPEG quality for --format jpg (default 95)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous shard set in --out")
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch mnist/fashion-mnist/cifar10 with torchvision (~/.cache/vaejob/<name>)",
    )
    p.add_argument(
        "--task-index", type=_int_type(0), help="job-array task I: write shards whose ordinal mod T == I"
    )
    p.add_argument("--num-tasks", type=_int_type(1), help="job-array size T (with --task-index)")
    p.add_argument(
        "--finalize",
        action="store_true",
        help="merge the job-array parts in --out into manifest.json (other flags are ignored: the parts carry them)",
    )
    return p


def _shards(n: int) -> str:
    return f"{n} shard{'' if n == 1 else 's'}"


def _summary(manifest: dict[str, Any], out: str, rate: float | None = None) -> str:
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    text = (
        f"vaejob.shard: {tr['count']} train ({_shards(len(tr['shards']))}) + {va['count']} val "
        f"({_shards(len(va['shards']))}) images, {len(manifest['skipped'])} skipped"
    )
    if rate is not None:
        text += f", {rate:,.0f} img/s"
    return f"{text} -> {out}"


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.finalize:
        if args.task_index is not None or args.num_tasks is not None:
            raise UsageError("--finalize runs once after all tasks: drop --task-index/--num-tasks")
        if args.out is None and not args.source:
            raise UsageError("--finalize needs --out DIR (the directory the array tasks wrote into)")
        out = args.out or os.path.join("shards", source_name(args.source))
        manifest = finalize(out)
        print(_summary(manifest, out))
        return 0
    if not args.source:
        raise UsageError(f"--source is required: {SPEC_HELP}")
    task_mode = args.task_index is not None or args.num_tasks is not None
    if task_mode and (args.task_index is None or args.num_tasks is None or args.task_index >= args.num_tasks):
        raise UsageError("--task-index I and --num-tasks T go together, with 0 <= I < T")
    out = args.out or os.path.join("shards", source_name(args.source))
    check_out_dir(out, args.overwrite, task_mode)

    source = open_source(args.source, size=args.size, seed=args.seed, download_data=args.download)
    official = source.official is not None and args.val_fraction is None
    settings = Settings(
        source=args.source,
        size=args.size or source.native_size,
        channels=args.channels or source.native_channels,
        val_fraction=None
        if official
        else (DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction),
        shard_size=args.shard_size,
        seed=args.seed,
        limit=args.limit,
        format=args.format,
        jpeg_quality=args.jpeg_quality,
    )
    splits = plan_splits(source, settings.val_fraction, settings.seed, settings.limit)
    if not any(splits.values()):
        raise UsageError(f"source {args.source!r} holds no images: check the path or --limit")
    tasks = plan_shards(splits, settings.shard_size)
    header = make_header(source, settings, tasks)
    if task_mode:
        tasks = [t for j, t in enumerate(tasks) if j % args.num_tasks == args.task_index]

    # Everything is validated: from here on we write.
    own = (
        [n for s, i, _ in tasks for n in (shard_name(s, i), shard_name(s, i) + ".tmp")] if task_mode else None
    )
    if args.overwrite or task_mode:
        _clear_out(out, own, args.task_index)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    results = write_shards(source, settings, out, tasks, args.workers)
    rate = sum(len(t[2]) for t in tasks) / max(time.perf_counter() - start, 1e-9)

    if task_mode:
        part_path = os.path.join(out, PARTS, f"part-{args.task_index}.json")
        part = {"format": PART_FORMAT, "task_index": args.task_index, "num_tasks": args.num_tasks}
        storage.atomic_write_json(part_path, {**part, "header": header, "shards": results})
        n = sum(r["count"] for r in results)
        print(
            f"vaejob.shard: task {args.task_index} of {args.num_tasks}: {n} images in {_shards(len(tasks))}, "
            f"{sum(len(r['skipped']) for r in results)} skipped, {rate:,.0f} img/s -> {part_path} "
            "(run --finalize when all tasks are done)"
        )
        return 0
    manifest = build_manifest(header, results)
    write_manifest(out, manifest)
    print(_summary(manifest, out, rate))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except (UsageError, SourceError) as e:
        print(f"vaejob.shard: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
