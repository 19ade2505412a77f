"""Write a shard set from a source: the parallel writer, the manifest, and the merge of job-array parts.

Each shard is one task for a worker process: written to ``NAME.tmp``, fsynced, renamed. ``manifest.json`` is
written last (``format.write_manifest``), so its presence means the set is complete. A job-array task writes
its shards plus ``parts/part-I.json`` (its results and the set's header); ``finalize`` merges the parts into
the same manifest a single run writes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from vaejob import storage
from vaejob.cli import UsageError
from vaejob.shards import outdir
from vaejob.shards.codec import encode_image
from vaejob.shards.format import PARTS, build_manifest, shard_name, write_manifest
from vaejob.shards.plan import SPLITS, ShardTask
from vaejob.shards.sources import Source, SourceError, fit
from vaejob.shards.tar import TarWriter

PART_FORMAT = "vaejob-shard-part/1"
# Peak memory of a writer process per byte of one output image, measured: synthetic renders a 2x
# supersampled float32 mask (2.0 GB at --size 8192, 10x its 201 MB image); an image folder decodes and
# resizes (1.2 GB, 6x).
WORKER_BYTES_PER_IMAGE_BYTE = 10


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


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------- worker side
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


class _NothingToWrite(Exception):
    """Aborts a shard's write (``storage.open_write``): nothing appears under its name."""


def _write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard (atomically, ``storage.open_write``: a local temp file renamed, or the object-store
    key itself); unreadable samples are skipped and reported, never fatal."""
    split, index, indices = task
    source: Source = _W["source"]
    st: Settings = _W["settings"]
    counter = _W["counter"]
    name = shard_name(split, index)
    skipped: list[dict[str, str]] = []
    count = pending = 0
    try:
        with storage.open_write(storage.join(_W["out"], name)) as f:
            tar = TarWriter(f)
            for i in indices:
                try:
                    arr, label, factors = source.load(i)
                    data = encode_image(fit(arr, st.size, st.channels), st.format, st.jpeg_quality)
                except MemoryError:
                    raise  # not the image's fault: skipping it would make the set depend on free memory
                except Exception as e:
                    skipped.append({"path": source.where(i), "reason": one_line(e)})
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
            if count == 0:  # every sample unreadable: no empty shard in the set
                raise _NothingToWrite
    except _NothingToWrite:
        pass
    counter.add(pending)
    return {
        "split": split,
        "index": index,
        "name": name,
        "count": count,
        "bytes": tar.pos,
        "sha256": tar.sha.hexdigest(),
        "skipped": skipped,
    }


# ------------------------------------------------------------------------------------------- the pool
def pool_size(workers: int, n_tasks: int) -> int:
    """Writer processes for ``n_tasks`` shards (1: written in this process)."""
    return 1 if workers <= 1 or n_tasks <= 1 else min(workers, n_tasks)


def worker_memory(size: int) -> int:
    """Estimated peak bytes of one writer process at output side ``size`` (sources load RGB at most)."""
    return WORKER_BYTES_PER_IMAGE_BYTE * size * size * 3


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def write_shards(
    source: Source, settings: Settings, out: str, tasks: list[ShardTask], workers: int
) -> list[dict[str, Any]]:
    """Write ``tasks`` into ``out`` with worker processes; results in task order. Leaves no ``.tmp`` on error.

    A process pool executor rather than ``multiprocessing.Pool``: a worker killed mid-shard (out of memory,
    a crash in an image decoder) fails the run with ``BrokenProcessPool`` instead of hanging it forever.
    """
    total = sum(len(t[2]) for t in tasks)
    bar = tqdm(total=total, unit="img", unit_scale=True, desc="vaejob.shard", disable=None, smoothing=0.1)
    done = False
    try:
        n_procs = pool_size(workers, len(tasks))
        if n_procs == 1:
            _init_worker(source, settings, out, _BarCounter(bar))
            results = [_write_shard(t) for t in tasks]
        else:
            value = mp.Value("q", 0)
            initargs = (source, settings, out, value)
            with ProcessPoolExecutor(n_procs, initializer=_init_worker, initargs=initargs) as ex:
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
        if not done:  # a killed writer process leaves its local temp file behind
            outdir.remove_temps(out, [shard_name(split, index) for split, index, _ in tasks])


def require_train(source: str, results: list[dict[str, Any]], fix: str) -> None:
    """Raise `SourceError` when the written shards hold no train image; ``fix`` ends the message.

    Planning refuses an empty train split, so an empty one here means every train image was unreadable.
    Planning also refuses an empty val split (unless ``--train-only``); one whose every image was unreadable
    is kept (the skipped images are listed in the manifest): vaejob.train and vaejob.evaluate refuse it.
    """
    train = [r for r in results if r["split"] == "train"]
    if any(r["count"] for r in train):
        return
    everything = not any(r["count"] for r in results)
    scope = sorted(results if everything else train, key=lambda r: (SPLITS.index(r["split"]), r["index"]))
    skipped = [s for r in scope for s in r["skipped"]]
    first = f" (first: {skipped[0]['path']!r}: {skipped[0]['reason']})" if skipped else ""
    what = "images" if everything else "train images"
    empty = "" if everything else ", so the train split would be empty"
    raise SourceError(
        f"all {len(skipped)} {what} of {source!r} were unreadable{first}{empty}; fix or remove them, {fix}"
    )


# ------------------------------------------------------------------------------------------- manifest
def make_header(source: Source, settings: Settings, tasks: list[ShardTask]) -> dict[str, Any]:
    """Everything the manifest needs besides the shard results (also carried by each job-array part)."""
    return {
        "source": settings.source,
        "seed": settings.seed,
        "encoding": settings.format,
        "image_shape": [settings.channels, settings.size, settings.size],
        "label_names": list(source.label_names) if source.label_names is not None else None,
        "factor_names": list(source.factor_names) if source.factor_names is not None else None,
        "args": asdict(settings),
        "scan_skipped": list(source.scan_skipped),
        "planned": {s: [len(t[2]) for t in tasks if t[0] == s] for s in SPLITS},
    }


def manifest_of(header: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest from a header and shard results in any order (so parts merge to identical bytes)."""
    splits = {
        split: sorted(
            (r for r in results if r["split"] == split and r["count"] > 0), key=lambda r: r["index"]
        )
        for split in SPLITS
    }
    return build_manifest(
        source=header["source"],
        seed=header["seed"],
        encoding=header["encoding"],
        image_shape=tuple(header["image_shape"]),
        splits=splits,
        args=header["args"],
        label_names=header["label_names"],
        factor_names=header["factor_names"],
        skipped=list(header["scan_skipped"]) + [s for r in results for s in r["skipped"]],
    )


# ------------------------------------------------------------------------------------------- job arrays
def write_part(out: str, task_index: int, num_tasks: int, header: dict[str, Any], results: list) -> str:
    path = storage.join(out, PARTS, f"part-{task_index}.json")
    part = {"format": PART_FORMAT, "task_index": task_index, "num_tasks": num_tasks}
    storage.atomic_write_json(path, {**part, "header": header, "shards": results})
    return path


def finalize(out: str) -> dict[str, Any]:
    """Merge ``parts/part-*.json`` of a job array into ``manifest.json``; raise `UsageError` if incomplete."""
    parts_dir = storage.join(out, PARTS)
    first = storage.join(parts_dir, "part-0.json")
    if not storage.exists(first):
        raise UsageError(f"--finalize: {first!r} not found: run every --task-index/--num-tasks task first")
    parts = [_read_part(first)]
    num_tasks = parts[0]["num_tasks"]
    for i in range(1, num_tasks):
        path = storage.join(parts_dir, f"part-{i}.json")
        if not storage.exists(path):
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
    require_train(header["source"], results, "then re-run every task and --finalize")
    manifest = manifest_of(header, results)
    names = set()
    for split in SPLITS:
        for s in manifest["splits"][split]["shards"]:
            path = storage.join(out, s["name"])
            if not storage.exists(path) or storage.size(path) != s["bytes"]:
                raise UsageError(
                    f"--finalize: {path!r} is missing or has the wrong size: re-run the task that wrote it"
                )
            names.add(s["name"])
    outdir.remove_stale_shards(out, keep=names)
    write_manifest(out, manifest)
    storage.remove(parts_dir)
    return manifest


def _read_part(path: str) -> dict[str, Any]:
    try:
        part = storage.read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--finalize: cannot read {path!r} ({one_line(e)}): re-run that task") from None
    if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
        raise UsageError(
            f"--finalize: {path!r} is not a vaejob.shard part file: remove it and re-run that task"
        )
    return part
