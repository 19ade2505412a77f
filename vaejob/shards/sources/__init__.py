"""Image sources that ``vaejob.shard`` turns into shard sets, opened from a spec string.

Specs: ``imagefolder:DIR``, ``fashion-mnist[:DIR]``, ``mnist[:DIR]``, ``cifar10[:DIR]``, ``synthetic[:N]``,
``hf:NAME_OR_PATH[:SPLIT]`` (Hugging Face datasets; the ``hf`` extra).
One module per source family; ``base`` holds the interface (``Source``) and the shared helpers.
"""

from __future__ import annotations

import os

from vaejob.shards.sources.base import KEY_MAX, Loaded, Source, SourceError, fit, sanitize_key
from vaejob.shards.sources.cifar import CIFAR10_NAMES, Cifar10
from vaejob.shards.sources.folder import IMAGE_EXTS, ImageFolder, folder_name
from vaejob.shards.sources.hf import HFDataset, split_spec
from vaejob.shards.sources.idx import FASHION_MNIST_NAMES, MNIST_NAMES, IdxSource, read_idx
from vaejob.shards.sources.synthetic import SHAPES, Synthetic, render_shape

__all__ = [
    "CIFAR10_NAMES",
    "FASHION_MNIST_NAMES",
    "IMAGE_EXTS",
    "KEY_MAX",
    "MNIST_NAMES",
    "SHAPES",
    "SPEC_HELP",
    "Cifar10",
    "HFDataset",
    "IdxSource",
    "ImageFolder",
    "Loaded",
    "Source",
    "SourceError",
    "Synthetic",
    "fit",
    "open_source",
    "parse_spec",
    "read_idx",
    "render_shape",
    "sanitize_key",
    "source_name",
]

SOURCE_KINDS = ("imagefolder", "fashion-mnist", "mnist", "cifar10", "synthetic", "hf")
SPEC_HELP = "imagefolder:DIR, fashion-mnist[:DIR], mnist[:DIR], cifar10[:DIR], synthetic[:N] or hf:NAME_OR_PATH[:SPLIT]"


def parse_spec(spec: str) -> tuple[str, str | None]:
    kind, sep, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source {spec!r}: use {SPEC_HELP}")
    if sep and not arg:
        raise SourceError(f"source {spec!r} has an empty argument after ':': use {SPEC_HELP}")
    if kind in ("imagefolder", "hf") and not arg:
        what = (
            "a directory: use imagefolder:DIR"
            if kind == "imagefolder"
            else "a dataset: use hf:NAME_OR_PATH[:SPLIT]"
        )
        raise SourceError(f"source {kind!r} needs {what}")
    return kind, (arg or None)


def source_name(spec: str) -> str:
    """Short name of a source spec (used for the default output directory ``shards/<name>``)."""
    kind, arg = parse_spec(spec)
    if kind == "hf" and arg:
        return "hf-" + folder_name(split_spec(arg)[0])
    return folder_name(arg) if kind == "imagefolder" and arg else kind


DEFAULT_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}


def download(kind: str, root: str) -> None:
    """Fetch an official dataset with torchvision into ``root`` (needs internet)."""
    try:
        import torchvision.datasets as tvd

        cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[kind]
        cls(root, train=True, download=True)
        cls(root, train=False, download=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(
            f"{kind}: download into {root!r} failed ({msg}): check the network or pass {kind}:DIR"
        ) from None


def open_source(
    spec: str,
    *,
    size: int | None = None,
    seed: int = 0,
    download_data: bool = False,
    cache_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> Source:
    """Open a source from its spec string; raise `SourceError` (one line) when it cannot be used."""
    kind, arg = parse_spec(spec)
    if (image_column or label_column) and kind != "hf":
        raise SourceError(f"--image-column/--label-column apply to hf: sources, not {kind}: drop them")
    if kind == "hf":
        if download_data:
            raise SourceError(
                "--download does not apply to hf: (hub names are downloaded by datasets): drop it"
            )
        assert arg is not None
        return HFDataset(arg, size, image_column, label_column)
    if download_data and kind in ("imagefolder", "synthetic"):
        raise SourceError(
            f"--download applies to mnist, fashion-mnist and cifar10, not {kind}: drop --download"
        )
    root = arg
    if download_data:
        root = arg or os.path.join(cache_dir or os.path.expanduser("~/.cache/vaejob"), kind)
        download(kind, root)
    if kind == "imagefolder":
        assert root is not None
        return ImageFolder(root, size)
    if kind == "synthetic":
        if arg is not None and not (arg.isdigit() and int(arg) > 0):
            raise SourceError(
                f"synthetic: N must be a positive integer, got {arg!r}: use e.g. synthetic:100000"
            )
        return Synthetic(int(arg) if arg else 100_000, size, seed)
    if kind == "cifar10":
        if root is None:
            raise SourceError("cifar10 needs a directory: pass cifar10:DIR, or --download")
        return Cifar10(root)
    names = FASHION_MNIST_NAMES if kind == "fashion-mnist" else MNIST_NAMES
    tv_dirname = "FashionMNIST" if kind == "fashion-mnist" else "MNIST"
    return IdxSource(kind, root or DEFAULT_DIRS[kind], list(names), tv_dirname)
