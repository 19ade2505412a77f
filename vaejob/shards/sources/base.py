"""What a source is: the interface ``vaejob.shard`` writes from, and the helpers every source shares.

A source is a small picklable object: ``name``, ``keys`` (one per sample, in the source's natural order),
optional per-sample ``official`` split ("train"/"val"), label and factor names, and ``load(i)`` returning
``(uint8 H×W×C array, label | None, factors | None)``. Worker processes receive the object once (inherited on
fork, pickled otherwise) and call ``load`` on the sample indices of their shard.
"""

from __future__ import annotations

import hashlib
import re
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from vaejob.cli import UserError
from vaejob.shards.codec import fit_image, to_mode

Loaded = tuple[np.ndarray, int | None, dict[str, Any] | None]

KEY_MAX = 80


class SourceError(UserError, ValueError):
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
    out = np.asarray(fit_image(to_mode(img, channels), size), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def read_image(src: str | IO[bytes], draft_size: int) -> np.ndarray:
    """An image file (path or binary stream) as an H×W×C uint8 array, C = 1 for greyscale (16-bit and float
    scaled to 8 bits) else 3 (transparency on white); EXIF orientation applied; JPEGs decoded at a reduced
    scale that keeps the shorter side >= ``draft_size``."""
    with Image.open(src) as im:
        im.draft("RGB", (draft_size, draft_size))  # JPEG: decode at a reduced scale (fast)
        im = ImageOps.exif_transpose(im)
        grey = im.mode in ("1", "L", "F") or im.mode.startswith("I")
        arr = np.asarray(to_mode(im, 1 if grey else 3), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def label_array(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    if len(labels) != n:
        raise SourceError(f"{what}: {len(labels)} labels for {n} images: the files do not belong together")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise SourceError(f"{what}: labels outside 0..9: not a 10-class label file, re-download it")
    return labels
