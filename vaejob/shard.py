"""Write a WebDataset shard set (docs/CONTRACTS.md) from an image source: ``python -m vaejob.shard``.

The bytes depend on the source, the seed and the byte-shaping flags only, never on ``--workers`` or
``--num-tasks`` (``vaejob.shards.plan``). Job arrays: ``--task-index I --num-tasks T`` writes the shards whose
ordinal (train then val) is ``I mod T`` plus ``parts/part-I.json``; ``--finalize`` then merges the parts into
the same manifest a single run writes (``vaejob.shards.write``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from vaejob import storage
from vaejob.cli import ArgumentParser, UsageError, UserError, error_line, fraction, int_type, report
from vaejob.shards import index
from vaejob.shards.format import ENCODINGS, MANIFEST, shard_name, write_manifest
from vaejob.shards.outdir import check_out_dir, clear_out, discard
from vaejob.shards.plan import DEFAULT_VAL_FRACTION, plan_shards, plan_splits
from vaejob.shards.sources import SPEC_HELP, Source, SourceError, open_source, source_name
from vaejob.shards.write import (
    Settings,
    available_memory,
    finalize,
    make_header,
    manifest_of,
    pool_size,
    require_train,
    worker_memory,
    write_part,
    write_shards,
)

PROG = "vaejob.shard"
# The largest --size: an 8192x8192x3 uint8 image is 201 MB and a writer process peaks near 10x that
# (write.WORKER_BYTES_PER_IMAGE_BYTE); larger sides are no VAE training data, they only exhaust memory.
MAX_SIZE = 8192


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="vaejob-shard",
        description="Write a WebDataset shard set (train-*.tar, val-*.tar, manifest.json) into a directory or "
        "an object store (s3://...), or index existing WebDataset tars in place (--index).",
        epilog=(
            f"Sources: {SPEC_HELP}. fashion-mnist/mnist read the IDX files (.gz or not; defaults "
            "/usr/share/datasets/<name>); cifar10 reads the official python pickle batches (trusted files only). "
            "Without --val-fraction, datasets with an official test split use it as val; otherwise val "
            f"membership is a hash of the key (default fraction {DEFAULT_VAL_FRACTION}). "
            "Job arrays: run each task with --task-index I --num-tasks T, then once with --finalize --out DIR."
        ),
    )
    p.add_argument("--source", help=f"what to shard: {SPEC_HELP}")
    p.add_argument(
        "--index",
        metavar="DIR_OR_PATTERN",
        help="index existing WebDataset tars in place (a directory, a brace pattern, an fsspec URL pattern "
        "such as s3://bucket/data-{00000..00099}.tar, or a wids shard-index JSON): writes only manifest.json",
    )
    p.add_argument(
        "--out",
        help="output directory or fsspec URL, e.g. s3://bucket/set (default shards/<source-name>; with --index: "
        "beside the tars)",
    )
    p.add_argument(
        "--val-shards",
        metavar="PATTERNS",
        help="--index: the shards (comma-separated name patterns, e.g. 'data-0009*.tar') that form val",
    )
    p.add_argument("--image-column", help="hf: the image column (default: the first Image feature)")
    p.add_argument("--label-column", help="hf: the label column (default: a ClassLabel feature, or 'label')")
    p.add_argument(
        "--size",
        type=int_type(1, MAX_SIZE),
        help=f"output side in pixels, at most {MAX_SIZE} (default: the source's native size)",
    )
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB); default: the source's")
    p.add_argument(
        "--val-fraction",
        type=fraction,
        help="val share in [0, 1) by key hash (default: official split, else 0.1)",
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="put every image in train and write no val split (for loader benchmarks: vaejob.train and "
        "vaejob.evaluate refuse such a set); without it an empty val split is refused",
    )
    p.add_argument("--shard-size", type=int_type(1), default=5000, help="samples per shard (default 5000)")
    p.add_argument(
        "--workers",
        type=int_type(1),
        default=min(8, os.cpu_count() or 1),
        help="writer processes (default min(8, CPUs))",
    )
    p.add_argument(
        "--seed", type=int_type(0), default=0, help="order within splits; synthetic content (default 0)"
    )
    p.add_argument(
        "--limit", type=int_type(1), help="keep only the first N samples (official splits: in proportion)"
    )
    p.add_argument(
        "--format",
        choices=ENCODINGS,
        default="npy",
        help="image encoding (default npy: raw uint8, no decode cost)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=int_type(1, 100),
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
        "--task-index", type=int_type(0), help="job-array task I: write shards whose ordinal mod T == I"
    )
    p.add_argument("--num-tasks", type=int_type(1), help="job-array size T (with --task-index)")
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
        f"{PROG}: {tr['count']} train ({_shards(len(tr['shards']))}) + {va['count']} val "
        f"({_shards(len(va['shards']))}) images, {len(manifest['skipped'])} skipped"
    )
    if rate is not None:
        text += f", {rate:,.0f} img/s"
    return f"{text} -> {out}"


def _finalize(args: argparse.Namespace) -> int:
    if args.task_index is not None or args.num_tasks is not None:
        raise UsageError("--finalize runs once after all tasks: drop --task-index/--num-tasks")
    if args.out is None and not args.source:
        raise UsageError("--finalize needs --out DIR (the directory the array tasks wrote into)")
    out = args.out or os.path.join("shards", source_name(args.source))
    print(_summary(finalize(out), out))
    return 0


def _check_splits(
    args: argparse.Namespace, source: Source, settings: Settings, splits: dict[str, list[int]]
) -> None:
    """Refuse, before writing, a plan with no image at all or none to train on."""
    if not any(splits.values()):
        raise UsageError(f"source {args.source!r} holds no images: check the path or --limit")
    if not splits["train"]:
        _refuse_empty_train(args, source, settings, len(splits["val"]))
    if not splits["val"] and not args.train_only:
        _refuse_empty_val(args, source, settings, len(splits["train"]))


def _refuse_empty_train(args: argparse.Namespace, source: Source, settings: Settings, n_val: int) -> None:
    if settings.val_fraction is not None:
        cause = f"--val-fraction {settings.val_fraction} puts all {n_val} images of {args.source!r} in val"
        fix = "lower --val-fraction (default 0.1)"
    else:
        cause, fix = _official_split_cause(args, source, "train", "train", n_val)
    raise UsageError(f"the train split would be empty: {cause}; {fix}")


def _refuse_empty_val(args: argparse.Namespace, source: Source, settings: Settings, n_train: int) -> None:
    """vaejob.train and vaejob.evaluate need val images: a set without any is refused unless asked for."""
    if settings.val_fraction is not None:
        f = settings.val_fraction
        given = "" if args.val_fraction is not None else " (the default)"
        cause = f"--val-fraction {f:g}{given} puts none of the {n_train} images of {args.source!r} in val"
        fix = (
            "raise --val-fraction" if f > 0 else f"pass --val-fraction F > 0 (default {DEFAULT_VAL_FRACTION})"
        )
        fix += ", or --train-only for a set without val (vaejob.train and vaejob.evaluate refuse it)"
    else:
        cause, fix = _official_split_cause(args, source, "val", "test", n_train)
    raise UsageError(f"the val split would be empty: {cause}; {fix}")


def _official_split_cause(
    args: argparse.Namespace, source: Source, split: str, official_name: str, n_other: int
) -> tuple[str, str]:
    """Why a source's official ``split`` (its ``official_name`` images) left that split empty, and the fix."""
    if args.limit is not None and split in (source.official or []):
        return f"--limit {args.limit} keeps none of the official {official_name} images of {args.source!r}", (
            "raise --limit"
        )
    return f"{args.source!r} has no official {official_name} images", (
        f"pass --val-fraction F to split its {n_other} images by key hash"
    )


def _check_memory(size: int, workers: int, n_tasks: int) -> None:
    """Refuse writer processes that do not fit in memory together: the kernel would kill one mid-run."""
    free = available_memory()
    per, procs = worker_memory(size), pool_size(workers, n_tasks)
    if free is None or per * procs <= free:
        return
    fits = free // per
    fix = f"pass --workers {fits} or a smaller --size" if fits else "pass a smaller --size"
    raise UsageError(
        f"--size {size} with --workers {workers} needs about {per * procs / 2**30:.1f} GiB ({procs} writer "
        f"processes x {per / 2**30:.1f} GiB), more than the {free / 2**30:.1f} GiB available; {fix}"
    )


def _check_train_only(args: argparse.Namespace) -> None:
    """``--train-only`` and a way to choose val contradict each other."""
    if not args.train_only:
        return
    other = "--val-shards" if args.val_shards else "--val-fraction" if args.val_fraction else None
    if other:
        raise UsageError(f"--train-only writes no val split but {other} chooses one: pass one")


def _index(args: argparse.Namespace) -> int:
    if args.source or args.finalize or args.task_index is not None:
        raise UsageError("--index reads existing tars: drop --source/--finalize/--task-index")
    if args.val_shards and args.val_fraction is not None:
        raise UsageError("--val-shards and --val-fraction are two ways to choose val: pass one")
    _check_train_only(args)
    if args.val_fraction == 0 and not args.train_only:  # known before the scan
        raise UsageError(
            f"--index {args.index}: --val-fraction 0 leaves the val split empty; pass --val-fraction F > 0 "
            f"(default {DEFAULT_VAL_FRACTION}) or --val-shards PATTERNS, or --train-only for a set without val "
            "(vaejob.train and vaejob.evaluate refuse it)"
        )
    urls = index.expand(args.index)
    out = args.out or index.default_out(urls, args.index)
    index.check_index_out(out, args.overwrite)
    start = time.perf_counter()
    results = index.scan(urls, args.workers)
    fraction = 0.0 if args.train_only else args.val_fraction
    manifest = index.build_index(results, out, args.index, fraction, args.val_shards, args.train_only)
    try:
        storage.makedirs(out)
        write_manifest(out, manifest)
    except OSError as e:
        raise UsageError(
            f"cannot write {storage.join(out, MANIFEST)} ({error_line(e)}); pass --out DIR"
        ) from None
    rate = manifest["images"]["count"] / max(time.perf_counter() - start, 1e-9)
    print(_summary(manifest, out, rate).replace(" images,", " images indexed,"))
    return 0


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.index:
        return _index(args)
    if args.finalize:
        return _finalize(args)
    if not args.source:
        raise UsageError(f"--source or --index is required: {SPEC_HELP}; or --index DIR_OR_PATTERN")
    task_mode = args.task_index is not None or args.num_tasks is not None
    if task_mode and (args.task_index is None or args.num_tasks is None or args.task_index >= args.num_tasks):
        raise UsageError("--task-index I and --num-tasks T go together, with 0 <= I < T")
    _check_train_only(args)
    out = args.out or os.path.join("shards", source_name(args.source))
    created = check_out_dir(out, args.overwrite, task_mode)

    source = open_source(
        args.source,
        size=args.size,
        seed=args.seed,
        download_data=args.download,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    if args.train_only:
        args.val_fraction = 0.0  # every key hashes at or above 0: all in train
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
    _check_splits(args, source, settings, splits)
    tasks = plan_shards(splits, settings.shard_size)
    header = make_header(source, settings, tasks)
    if task_mode:
        tasks = [t for j, t in enumerate(tasks) if j % args.num_tasks == args.task_index]
    _check_memory(settings.size, args.workers, len(tasks))

    # Everything is validated: from here on we write.
    own = [shard_name(s, i) for s, i, _ in tasks] if task_mode else None
    if args.overwrite or task_mode:
        clear_out(out, own, args.task_index)
    storage.makedirs(out)
    start = time.perf_counter()
    results = write_shards(source, settings, out, tasks, args.workers)
    rate = sum(len(t[2]) for t in tasks) / max(time.perf_counter() - start, 1e-9)

    if task_mode:
        part_path = write_part(out, args.task_index, args.num_tasks, header, results)
        n = sum(r["count"] for r in results)
        print(
            f"{PROG}: task {args.task_index} of {args.num_tasks}: {n} images in {_shards(len(tasks))}, "
            f"{sum(len(r['skipped']) for r in results)} skipped, {rate:,.0f} img/s -> {part_path} "
            "(run --finalize when all tasks are done)"
        )
        return 0
    try:  # a task cannot tell (it sees only its shards): finalize checks the whole set
        require_train(settings.source, results, "or point --source at other images")
    except SourceError:
        discard(out, [r["name"] for r in results if r["count"]], created)
        raise
    manifest = manifest_of(header, results)
    write_manifest(out, manifest)
    print(_summary(manifest, out, rate))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except UserError as e:
        return report(PROG, e)


if __name__ == "__main__":
    sys.exit(main())
