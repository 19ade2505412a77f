"""Image sources that `vaejob.shard` turns into shard sets.

A source is a small picklable object: ``name``, ``keys`` (one per sample, in the source's natural order),
optional per-sample ``official`` split ("train"/"val"), label and factor names, and ``load(i)`` returning
``(uint8 H×W×C array, label | None, factors | None)``. Worker processes receive the object once (inherited on
fork, pickled otherwise) and call ``load`` on the sample indices of their shard.

Spec strings: ``imagefolder:DIR``, ``fashion-mnist[:DIR]``, ``mnist[:DIR]``, ``cifar10[:DIR]``, ``synthetic[:N]``.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import math
import os
import pickle
import re
import struct
from typing import Any

import numpy as np
from PIL import Image, ImageOps

Loaded = tuple[np.ndarray, int | None, dict[str, Any] | None]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
KEY_MAX = 80
FASHION_MNIST_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_NAMES = [str(d) for d in range(10)]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHAPES = ["square", "ellipse", "triangle", "heart"]
SOURCE_KINDS = ("imagefolder", "fashion-mnist", "mnist", "cifar10", "synthetic")
SPEC_HELP = "imagefolder:DIR, fashion-mnist[:DIR], mnist[:DIR], cifar10[:DIR] or synthetic[:N]"


class SourceError(ValueError):
    """A source cannot be opened; the message is one line naming the thing and the fix."""


class Source:
    name: str
    keys: list[str]
    # Per-sample official split ("train" or "val") for datasets that ship one, else None.
    official: list[str] | None = None
    label_names: list[str] | None = None
    factor_names: list[str] | None = None
    # Output geometry when --size/--channels are not given.
    native_size: int
    native_channels: int
    # Files rejected while listing the source (before any loading): [{path, reason}].
    scan_skipped: list[dict[str, str]]

    def load(self, i: int) -> Loaded:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Human-readable location of sample ``i`` for the manifest's ``skipped`` list."""
        return self.keys[i]


# --------------------------------------------------------------------------------------------- helpers


def sanitize_key(relpath: str) -> str:
    """A tar-safe unique key for a relative path: ``[A-Za-z0-9_-]`` only, at most 80 characters.

    The sha1 suffix keeps keys unique when sanitizing or truncating maps two paths to the same text; no key
    contains a dot or a slash, so it can never name a path outside the extraction directory.
    """
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    text = re.sub(r"[^A-Za-z0-9_-]", "_", relpath)
    # Keep the tail: file names differ at the end far more often than at the start.
    return f"{text[-(KEY_MAX - 9) :]}-{digest}"


def fit(arr: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Resize an H×W×C uint8 array to size×size×channels (shorter side to ``size``, centre crop)."""
    h, w, c = arr.shape
    if (h, w, c) == (size, size, channels):
        return arr
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if c != channels:
        img = img.convert("L" if channels == 1 else "RGB")
    if (h, w) != (size, size):
        side = min(h, w)
        left, top = (w - side) / 2, (h - side) / 2
        # One LANCZOS pass over the centre square: anti-aliased downscale and crop together.
        img = img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def _label_array(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    if len(labels) != n:
        raise SourceError(f"{what}: {len(labels)} labels for {n} images: the files do not belong together")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise SourceError(f"{what}: labels outside 0..9: not a 10-class label file, re-download it")
    return labels


# --------------------------------------------------------------------------------------------- imagefolder


class ImageFolder(Source):
    """Every image under ``root`` (sorted); labels = immediate subfolder names when there are subfolders."""

    native_size = 64
    native_channels = 3

    def __init__(self, root: str, size: int | None = None) -> None:
        if not os.path.isdir(root):
            raise SourceError(
                f"imagefolder: {root!r} is not a directory: pass imagefolder:DIR with an existing folder"
            )
        self.root = root
        self.name = folder_name(root)
        # JPEG draft decoding only needs to keep the shorter side >= the output size.
        self.draft_size = size or self.native_size
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, root)
            for fn in filenames:
                if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTS):
                    rel = fn if rel_dir == "." else os.path.join(rel_dir, fn)
                    files.append(rel.replace(os.sep, "/"))
        files.sort()
        self.scan_skipped = []
        classes = sorted({f.split("/", 1)[0] for f in files if "/" in f})
        if classes:
            # With class subfolders, a loose image at the top level has no label: list it instead.
            loose = [f for f in files if "/" not in f]
            self.scan_skipped = [
                {"path": os.path.join(root, f), "reason": "image outside the class subfolders"} for f in loose
            ]
            files = [f for f in files if "/" in f]
            index = {c: k for k, c in enumerate(classes)}
            self.labels: list[int] | None = [index[f.split("/", 1)[0]] for f in files]
            self.label_names = classes
        else:
            self.labels = None
        if not files:
            raise SourceError(
                f"imagefolder: no images ({', '.join(IMAGE_EXTS)}) under {root!r}: point imagefolder:DIR at your images"
            )
        self.files = files
        self.keys = [sanitize_key(f) for f in files]
        if len(set(self.keys)) != len(self.keys):
            seen: dict[str, str] = {}
            for f, k in zip(files, self.keys, strict=True):
                if k in seen:
                    raise SourceError(
                        f"imagefolder: {seen[k]!r} and {f!r} map to the same key {k!r}: rename one"
                    )
                seen[k] = f

    def where(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def load(self, i: int) -> Loaded:
        with Image.open(self.where(i)) as im:
            im.draft("RGB", (self.draft_size, self.draft_size))  # JPEG: decode at a reduced scale (fast)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                # Transparent pixels become white rather than whatever colour they happen to store.
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            if im.mode.startswith("I") or im.mode == "F":
                # 16-bit (or float) greyscale: PIL's convert("L") would clip to 255 instead of scaling.
                wide = np.asarray(im, dtype=np.float64)
                arr = np.clip(wide / (257.0 if im.mode != "F" else 1.0) + 0.5, 0, 255).astype(np.uint8)
            else:
                arr = np.asarray(im.convert("L" if im.mode in ("1", "L") else "RGB"), dtype=np.uint8)
        arr = arr[..., None] if arr.ndim == 2 else arr
        return arr, (self.labels[i] if self.labels is not None else None), None


# --------------------------------------------------------------------------------------------- IDX (MNIST)


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX ubyte file (optionally gzipped) with ``ndim`` dimensions, validating magic and size."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot read ({e}): re-download the file") from None
    head = 4 + 4 * ndim
    if len(data) < head or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise SourceError(
            f"{path}: not an IDX{ndim} ubyte file (magic {data[:4].hex() or 'missing'}, "
            f"expected 0000080{ndim}): re-download the file"
        )
    dims = struct.unpack(f">{ndim}I", data[4:head])
    if len(data) - head != math.prod(dims):
        raise SourceError(
            f"{path}: header says shape {dims} ({math.prod(dims)} bytes) but holds {len(data) - head}: "
            "the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


class IdxSource(Source):
    """MNIST-format datasets: both official splits, train first (keys ``train-NNNNN``, ``test-NNNNN``)."""

    native_channels = 1
    FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(self, name: str, root: str, label_names: list[str], tv_dirname: str) -> None:
        self.name = name
        self.label_names = label_names
        self.scan_skipped = []
        if not os.path.isdir(root):
            raise SourceError(
                f"{name}: {root!r} is not a directory: pass {name}:DIR with the IDX files, or --download"
            )
        # Also accept a torchvision root (ROOT/FashionMNIST/raw/...).
        dirs = [root, os.path.join(root, tv_dirname, "raw")]
        images, labels, official, keys = [], [], [], []
        for split, (img_name, lab_name) in self.FILES.items():
            img_path, lab_path = (self._find(dirs, n) for n in (img_name, lab_name))
            imgs = read_idx(img_path, 3)
            labs = _label_array(read_idx(lab_path, 1), len(imgs), f"{name}: {lab_path}")
            prefix = "train" if split == "train" else "test"
            images.append(imgs)
            labels.append(labs)
            official += [split] * len(imgs)
            keys += [f"{prefix}-{k:05d}" for k in range(len(imgs))]
        shapes = {im.shape[1:] for im in images}
        if len(shapes) != 1:
            raise SourceError(
                f"{name}: train and test images differ in size {sorted(shapes)}: mixed datasets in {root!r}"
            )
        self.images = np.concatenate(images)
        self.labels = np.concatenate(labels)
        self.official = official
        self.keys = keys
        self.native_size = int(self.images.shape[1])

    def _find(self, dirs: list[str], base: str) -> str:
        for d in dirs:
            for candidate in (base, base + ".gz"):
                path = os.path.join(d, candidate)
                if os.path.isfile(path):
                    return path
        raise SourceError(
            f"{self.name}: missing {base}[.gz] in {dirs[0]!r}: pass {self.name}:DIR with the IDX files, or --download"
        )

    def load(self, i: int) -> Loaded:
        return self.images[i][..., None], int(self.labels[i]), None


# --------------------------------------------------------------------------------------------- CIFAR-10


class Cifar10(Source):
    """The official python batches. They are pickles: only open files from a source you trust."""

    name = "cifar10"
    native_size = 32
    native_channels = 3

    def __init__(self, root: str) -> None:
        self.scan_skipped = []
        nested = os.path.join(root, "cifar-10-batches-py")
        folder = nested if os.path.isdir(nested) else root
        if not os.path.isdir(folder):
            raise SourceError(
                f"cifar10: {root!r} is not a directory: pass cifar10:DIR (cifar-10-batches-py or its parent), or --download"
            )
        images, labels, keys, official = [], [], [], []
        batches = [(f"data_batch_{k}", "train") for k in range(1, 6)] + [("test_batch", "val")]
        counters = {"train": 0, "val": 0}
        for fname, split in batches:
            data, labs = self._read_batch(os.path.join(folder, fname))
            prefix = "train" if split == "train" else "test"
            keys += [f"{prefix}-{counters[split] + k:05d}" for k in range(len(data))]
            counters[split] += len(data)
            official += [split] * len(data)
            # Rows are 1024 red, 1024 green, 1024 blue values (CHW): make them HWC.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(labs)
        self.images = np.ascontiguousarray(np.concatenate(images))
        self.labels = np.concatenate(labels)
        self.keys = keys
        self.official = official
        self.label_names = self._read_names(os.path.join(folder, "batches.meta"))

    @staticmethod
    def _unpickle(path: str) -> dict:
        if not os.path.isfile(path):
            raise SourceError(
                f"cifar10: missing {path!r}: pass cifar10:DIR with the python batches (cifar-10-python.tar.gz), or --download"
            )
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f, encoding="bytes")
        except Exception as e:
            raise SourceError(
                f"cifar10: {path!r} is not a CIFAR python batch ({type(e).__name__}): re-download it"
            ) from None
        if not isinstance(obj, dict):
            raise SourceError(
                f"cifar10: {path!r} is not a CIFAR python batch (no dict inside): re-download it"
            )
        return obj

    def _read_batch(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        obj = self._unpickle(path)
        data, labels = obj.get(b"data"), obj.get(b"labels")
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
        ):
            raise SourceError(f"cifar10: {path!r} has no uint8 N×3072 'data' array: re-download it")
        labs = _label_array(
            np.asarray(labels if labels is not None else [], dtype=np.int64), len(data), f"cifar10: {path}"
        )
        return data, labs

    def _read_names(self, path: str) -> list[str]:
        names = self._unpickle(path).get(b"label_names")
        if not isinstance(names, list) or len(names) != 10:
            return list(CIFAR10_NAMES)
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]

    def load(self, i: int) -> Loaded:
        return self.images[i], int(self.labels[i]), None


# --------------------------------------------------------------------------------------------- synthetic


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of points inside unit-size shape ``shape`` (local coordinates, v pointing up)."""
    if shape == 0:  # square of half-side 0.8 (same area class as the others)
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == 1:  # ellipse, aspect 0.55 so its rotation is visible
        return u * u + (v * v) / 0.3025 <= 1.0
    if shape == 2:  # equilateral triangle inscribed in the unit circle, apex up at rotation 0
        return (v >= -0.5) & (0.8660254 * u + 0.5 * v <= 0.5) & (-0.8660254 * u + 0.5 * v <= 0.5)
    x, y = u * 1.15, v * 1.15 + 0.15  # heart curve (x²+y²-1)³ - x²y³ <= 0, centred in the unit circle
    r = x * x + y * y - 1.0
    return r * r * r - x * x * y * y * y <= 0.0


_LEVELS = np.linspace(0.0, 1.0, 5)[:, None]


def render_shape(f: dict[str, Any], size: int) -> np.ndarray:
    """Render factors ``f`` to a size×size×3 uint8 image: 2× supersampled mask, 2×2 box downsample."""
    hits = np.zeros((size, size), np.uint8)  # supersamples inside the shape per output pixel, 0..4
    # Only pixels near the shape are evaluated (its extent is < 1.2 half-sizes from the centre): 3-5× faster.
    reach = 1.2 * f["scale"]
    x0, x1 = max(0, int((f["x"] - reach) * size)), min(size, math.ceil((f["x"] + reach) * size))
    y0, y1 = max(0, int((f["y"] - reach) * size)), min(size, math.ceil((f["y"] + reach) * size))
    if x1 > x0 and y1 > y0:
        n = 2 * size  # supersampled canvas: pixel centres at (k + 0.5) / n
        dx = ((np.arange(2 * x0, 2 * x1, dtype=np.float32) + 0.5) / n - f["x"])[None, :]
        dy = (f["y"] - (np.arange(2 * y0, 2 * y1, dtype=np.float32) + 0.5) / n)[:, None]  # y up
        th = math.radians(f["rotation"])
        c, s = math.cos(th) / f["scale"], math.sin(th) / f["scale"]
        m = _inside(f["shape"], c * dx + s * dy, c * dy - s * dx).view(np.uint8)
        hits[y0:y1, x0:x1] = m[0::2, 0::2] + m[1::2, 0::2] + m[0::2, 1::2] + m[1::2, 1::2]
    # Five coverage levels only: blend them once into a palette and index it (much cheaper than per pixel).
    fg = np.array(colorsys.hsv_to_rgb(f["hue"], 0.85, 0.95))
    bg = np.array(colorsys.hsv_to_rgb(f["bg_hue"], 0.35, f["bg_brightness"]))
    palette = (255.0 * (bg + _LEVELS * (fg - bg)) + 0.5).astype(np.uint8)
    return np.take(palette, hits, axis=0)


class Synthetic(Source):
    """Procedural dSprites / 3D-shapes style images with known generative factors.

    Factors of sample ``i`` come from ``default_rng([seed, i])`` only, so the bytes never depend on how samples
    are spread over worker processes. Values are rounded so ``{key}.json`` describes the image exactly.
    """

    name = "synthetic"
    native_size = 64
    native_channels = 3
    label_names = SHAPES
    factor_names = sorted(["shape", "hue", "scale", "rotation", "x", "y", "bg_brightness", "bg_hue"])

    def __init__(self, n: int, size: int | None = None, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        self.size = size or self.native_size
        self.keys = [f"{i:08d}" for i in range(n)]
        self.scan_skipped = []

    def factors(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, i])
        shape = int(rng.integers(len(SHAPES)))
        u = rng.random(7)
        return {
            "shape": shape,
            "hue": round(float(u[0]), 4),
            "scale": round(0.10 + 0.15 * float(u[1]), 4),  # half-extent as a fraction of the image side
            "rotation": round(360.0 * float(u[2]), 2),  # degrees
            "x": round(0.25 + 0.5 * float(u[3]), 4),  # centre, fraction of the image side
            "y": round(0.25 + 0.5 * float(u[4]), 4),
            "bg_brightness": round(0.05 + 0.5 * float(u[5]), 4),
            "bg_hue": round(float(u[6]), 4),
        }

    def load(self, i: int) -> Loaded:
        f = self.factors(i)
        return render_shape(f, self.size), f["shape"], f


# --------------------------------------------------------------------------------------------- opening


def parse_spec(spec: str) -> tuple[str, str | None]:
    kind, sep, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source {spec!r}: use {SPEC_HELP}")
    if sep and not arg:
        raise SourceError(f"source {spec!r} has an empty argument after ':': use {SPEC_HELP}")
    if kind == "imagefolder" and not arg:
        raise SourceError("source 'imagefolder' needs a directory: use imagefolder:DIR")
    return kind, (arg or None)


def source_name(spec: str) -> str:
    """Short name of a source spec (used for the default output directory ``shards/<name>``)."""
    kind, arg = parse_spec(spec)
    return folder_name(arg) if kind == "imagefolder" and arg else kind


def folder_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.abspath(path))) or "imagefolder"


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
) -> Source:
    """Open a source from its spec string; raise `SourceError` (one line) when it cannot be used."""
    kind, arg = parse_spec(spec)
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
