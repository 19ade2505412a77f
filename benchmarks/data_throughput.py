"""Decoded images/s: the vaejob shard loader vs torchvision ImageFolder and plain webdataset, on the same images.

    python benchmarks/data_throughput.py                 # 20k synthetic 64x64 RGB, 2 workers
    python benchmarks/data_throughput.py --num 2000      # quick (CI): a smoke test, mostly start-up costs

Writes npy shards with ``vaejob.shard``, the same images as PNG files in an ImageFolder tree, and png shards,
then times full epochs of:

  imagefolder     ImageFolder + PIL + ToTensor + DataLoader(batch_size, shuffle=True, num_workers=W,
                  persistent_workers=True)
  webdataset      the plain webdataset package on the SAME npy shards: WebDataset (shard shuffle, split by
                  worker) -> shuffle(buffer) -> decode -> to_tuple -> batched -> float32 NCHW / 255,
                  WebLoader(num_workers=W, persistent_workers=True)
  vaejob-npy      vaejob loader on npy shards, float output (raw=False), same W and shuffle buffer
  read-only       W persistent workers iterating the npy shards' members without decoding (reader ceiling)
  vaejob-png      vaejob loader on png shards, float output (reference)

Every method keeps its worker processes across epochs, as a training job does (the vaejob loader always
does); each timed epoch still pays its own start (first batches, vaejob's shuffle-buffer fill).

The methods run interleaved, ``--repeats`` rounds, so machine noise hits them alike; the table shows the
median and best round, and images per CPU-second summed over all processes (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaejob import shard
from vaejob.loader import make_loader
from vaejob.shards import ShardSet, open_shards
from vaejob.shards.codec import Decoder
from vaejob.shards.tar import read_segment


def make_data(root: Path, num: int, size: int, workers: int) -> tuple[Path, Path, Path]:
    npy, png, folder = root / "npy", root / "png", root / "imagefolder"
    common = ["--source", f"synthetic:{num}", "--size", str(size), "--train-only", "--seed", "0"]
    common += ["--shard-size", str(max(1, num // 8)), "--workers", str(workers)]
    for out, fmt in ((npy, "npy"), (png, "png")):
        if not (out / "manifest.json").exists():
            if shard.main([*common, "--out", str(out), "--format", fmt]) != 0:
                raise SystemExit(f"vaejob.shard failed for {out}")
    if not folder.exists():
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shards = open_shards(str(npy))
        decoder = Decoder(shards.encoding, shards.image_shape)
        split = shards.split("train")
        for url, count in zip(split.urls, split.counts, strict=True):
            for _, key, members in read_segment(url, 0, count, count, decoder.wanted):
                label = int(members["cls"])
                (tmp / f"class_{label}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(decoder.image(url, key, members)).save(tmp / f"class_{label}" / f"{key}.png")
        tmp.rename(folder)
    return npy, png, folder


def count(batches: Iterator, dtype: torch.dtype = torch.float32) -> int:
    n = 0
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        if images.dtype != dtype:
            raise AssertionError(f"expected {dtype} images, got {images.dtype}")
        n += images.shape[0]
    return n


def imagefolder(folder: Path, batch_size: int, workers: int) -> Callable[[int], int]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    ds = ImageFolder(str(folder), transform=ToTensor())
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True)
    return lambda epoch: count(iter(loader))


def webdataset_loader(shards: ShardSet, batch_size: int, workers: int, buffer: int) -> Callable[[int], int]:
    """The usual webdataset pipeline over the same npy shards, with the same output as the vaejob loader."""
    import webdataset as wds

    def to_float(images: Any) -> torch.Tensor:  # stacked uint8 N×H×W×C -> float32 N×C×H×W in [0, 1]
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float().div_(255)

    urls = list(shards.split("train").urls)
    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(buffer)
        .decode()
        .to_tuple("npy", "cls")
        .batched(batch_size, partial=False)
        .map_tuple(to_float, torch.as_tensor)
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=True)
    return lambda epoch: count(iter(loader))


class VaejobEpochs:
    """The vaejob loader, one epoch per call (returns the images read); ``close()`` stops its workers.
    ``raw=True, pin_memory=True`` is what the trainer asks for on a GPU (uint8 batches in page-locked memory,
    converted on the device)."""

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        workers: int,
        buffer: int,
        raw: bool = False,
        pin_memory: bool = False,
    ) -> None:
        self.dtype = torch.uint8 if raw else torch.float32
        self.loader = make_loader(
            shards,
            "train",
            batch_size,
            num_workers=workers,
            shuffle_buffer=buffer,
            rank=0,
            world_size=1,
            raw=raw,
            pin_memory=pin_memory,
        )

    def __call__(self, epoch: int) -> int:
        self.loader.set_epoch(epoch)
        return count(iter(self.loader), self.dtype)

    def close(self) -> None:
        self.loader.close()


class _ReadOnly(IterableDataset):
    """Worker i reads shards i, i+W, ...: every member's bytes, nothing decoded."""

    def __init__(self, shards: ShardSet) -> None:
        self.split = shards.split("train")
        self.wanted = Decoder(shards.encoding, shards.image_shape).wanted

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        pairs = list(zip(self.split.urls, self.split.counts, strict=True))[wid::nw]
        for url, c in pairs:
            yield sum(1 for _ in read_segment(url, 0, c, c, self.wanted))


def read_only(shards: ShardSet, workers: int) -> Callable[[int], int]:
    loader = DataLoader(_ReadOnly(shards), batch_size=None, num_workers=workers, persistent_workers=True)
    return lambda epoch: sum(loader)


def cpu_seconds() -> float:
    """CPU time of this process and its children: reaped ones from rusage, live ones (persistent workers)
    from /proc (Linux; elsewhere only reaped children count)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def timed(fn: Callable[[int], int], epoch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second over all processes)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    n = fn(epoch)
    return n / (time.perf_counter() - wall), n / (cpu_seconds() - cpu)


Rates = dict[str, list[float]]


def interleaved(methods: dict[str, Callable[[int], int]], repeats: int) -> tuple[Rates, Rates]:
    """One warm-up epoch each (worker start, page cache, imports), then ``repeats`` rounds in which every
    method runs one epoch in turn: (images per wall second, images per CPU second) per method and round."""
    for fn in methods.values():
        fn(0)
    rates: Rates = {name: [] for name in methods}
    per_cpu: Rates = {name: [] for name in methods}
    for r in range(repeats):
        for name, fn in methods.items():
            wall, cpu = timed(fn, r + 1)
            rates[name].append(wall)
            per_cpu[name].append(cpu)
    return rates, per_cpu


def print_rates(rates: Rates, per_cpu: Rates) -> None:
    med = statistics.median
    print(f"\n{'method':<12} {'img/s median':>13} {'img/s best':>11} {'img/CPU-s':>10}   img/s per round")
    for name, values in rates.items():
        rounds = " ".join(f"{v:,.0f}" for v in values)
        print(
            f"{name:<12} {med(values):>13,.0f} {max(values):>11,.0f} {med(per_cpu[name]):>10,.0f}   {rounds}"
        )
    print()


def loader_args(
    argv: list[str] | None,
    doc: str,
    num: int,
    num_help: str,
    batch_size: int,
    shuffle_buffer: int,
    repeats: int,
) -> argparse.Namespace:
    """The flags every loader benchmark shares, with each one's own defaults."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--num", type=int, default=num, help=f"{num_help} (default {num}; {num // 10} = quick)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for every method (default 2)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument(
        "--shuffle-buffer", type=int, default=shuffle_buffer, help="samples, vaejob and webdataset alike"
    )
    p.add_argument("--repeats", type=int, default=repeats, help=f"interleaved rounds (default {repeats})")
    p.add_argument("--dir", help="keep the generated data here (default: a temporary directory, removed)")
    return p.parse_args(argv)


def print_header(argv: list[str] | None, what: str, args: argparse.Namespace) -> None:
    """The command line and the conditions, so a pasted result says how it was made."""
    print("$ " + shlex.join(["python", *sys.argv] if argv is None else ["python", sys.argv[0], *argv]))
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.num} {what}, "
        f"batch {args.batch_size}, {args.workers} workers, {args.repeats} rounds"
    )


def main(argv: list[str] | None = None) -> int:
    args = loader_args(argv, __doc__, 20000, "images", batch_size=256, shuffle_buffer=2000, repeats=5)
    print_header(argv, f"images {args.size}x{args.size} RGB", args)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vaejob-bench-"))
    try:
        t0 = time.perf_counter()
        npy, png, folder = make_data(root, args.num, args.size, args.workers)
        print(f"data ready in {time.perf_counter() - t0:.1f} s under {root}")
        npy_set, png_set = open_shards(str(npy)), open_shards(str(png))
        b, w, buf = args.batch_size, args.workers, args.shuffle_buffer
        methods: dict[str, Callable[[int], int]] = {
            "imagefolder": imagefolder(folder, b, w),
            "webdataset": webdataset_loader(npy_set, b, w, buf),
            "vaejob-npy": VaejobEpochs(npy_set, b, w, buf),
            "read-only": read_only(npy_set, w),
            "vaejob-png": VaejobEpochs(png_set, b, w, buf),
        }
        rates, per_cpu = interleaved(methods, args.repeats)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print_rates(rates, per_cpu)
    med = statistics.median
    for peer in ("imagefolder", "webdataset"):
        wall = med(rates["vaejob-npy"]) / med(rates[peer])
        best = max(rates["vaejob-npy"]) / max(rates[peer])
        cpu = med(per_cpu["vaejob-npy"]) / med(per_cpu[peer])
        print(
            f"vaejob-npy / {peer}: {wall:.1f}x img/s (median), {best:.1f}x (best), {cpu:.1f}x img per CPU-s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
