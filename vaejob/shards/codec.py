"""Image codecs of shard members: encode uint8 H×W×C arrays as ``npy`` / ``png`` / ``jpg`` bytes, and decode
them back (npy / png / jpg / webp), validated against the manifest's image shape or brought to a target
size and channel count (``fit_image``, ``to_mode``: the one place images are resized and converted).

``npy`` is the default because reading it is a memcpy: a 64×64 PNG decode costs ~300 µs, which would cap a
loader worker near 3k images/s (shards/README.md).
"""

from __future__ import annotations

import functools
import io
import math
import re

import numpy as np
from PIL import Image

from vaejob.shards.format import CHANNEL_MODES, IMAGE_EXTS, DataError, ShardSet

_NPY_HEADER = re.compile(  # what np.save writes (keys sorted), e.g. {'descr': '|u1', 'fortran_order': ...
    r"\{'descr': '(?P<descr>[^']+)', 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>[0-9, ]*)\), *\}"
)


# ------------------------------------------------------------------------------------------------ encode
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


# ------------------------------------------------------------------------------------------------ resize
def fit_image(img: Image.Image, size: int, resize: str = "center_crop") -> Image.Image:
    """``img`` as ``size`` x ``size``: ``center_crop`` scales the shorter side to ``size`` and crops the
    centre, ``resize`` stretches (aspect not kept), ``pad`` scales the longer side to ``size`` and pads
    with black. One LANCZOS pass (anti-aliased down-scaling, smooth up-scaling)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    lanczos = Image.Resampling.LANCZOS
    if resize == "resize":
        return img.resize((size, size), lanczos)
    if resize == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new(img.mode, (size, size))
        canvas.paste(img.resize((nw, nh), lanczos), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), lanczos, box=(left, top, left + side, top + side))


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """``img`` as L (1 channel) or RGB (3): transparency composited on white, 16-bit and float greyscale
    scaled (not clipped) to 8 bits, palette / CMYK / YCbCr converted; ``channels`` 4 keeps RGBA."""
    want = CHANNEL_MODES[channels]
    if img.mode == want:
        return img
    if want != "RGBA" and (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    elif img.mode.startswith("I") or img.mode == "F":  # PIL's convert("L") would clip to 255
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(
            np.clip(wide / (1.0 if img.mode == "F" else 257.0) + 0.5, 0, 255).astype(np.uint8)
        )
    return img if img.mode == want else img.convert(want)


# ------------------------------------------------------------------------------------------------ decode
class BadImage(DataError):
    """One sample's image cannot be used (not an image, undecodable, truncated, wrong shape)."""


# JPEG draft decoding (DCT-domain down-scaling by 1/2, 1/4, 1/8) keeps at least this multiple of the target
# side, so the LANCZOS pass still anti-aliases: benchmarks/decode_throughput.py measured 1.8x the speed of
# a full decode at a mean difference of under 1 grey level (plain 1x draft: 2.6x, but ~2 levels).
DRAFT_OVERSAMPLE = 2


class Decoder:
    """Decodes raw samples to uint8 (H, W, C) arrays of ``shape`` (C, H, W).

    ``native`` is the shape the manifest promises (None: many shapes). When it equals ``shape`` every image
    must have exactly that shape (vaejob's own sets); otherwise each image is converted to the channels
    and brought to the size by ``resize`` (``fit_image``). ``encoding`` ``image`` picks the sample's
    jpg / jpeg / png / webp member. Problems raise ``BadImage`` (a ``DataError``).
    """

    def __init__(
        self,
        encoding: str,
        shape: tuple[int, int, int],
        native: tuple[int, int, int] | None = None,
        resize: str = "center_crop",
    ) -> None:
        self.encoding, self.shape, self.resize = encoding, shape, resize
        self.native = shape if native is None and encoding != "image" else native
        self.fits = self.native != shape
        if shape[1] != shape[2] and self.fits:
            raise DataError(f"a target image size must be square, got {shape[2]}x{shape[1]}")
        self.exts = IMAGE_EXTS if encoding == "image" else (encoding,)
        self.tolerant = encoding == "image"  # foreign images: a bad one is skipped and counted (collate)
        self.wanted = frozenset((*self.exts, "cls"))
        self._npy_ok = b""  # header prefix already validated: identical for every sample

    @classmethod
    def for_set(cls, shards: ShardSet) -> Decoder:
        return cls(shards.encoding, shards.image_shape, shards.native_shape, shards.resize)

    def image(self, url: str, key: str, members: dict[str, bytes]) -> np.ndarray:
        for ext in self.exts:
            data = members.get(ext)
            if data is not None:
                break
        else:
            what = f"a .{self.encoding} member" if self.encoding != "image" else "an image member"
            raise BadImage(
                f"sample {key!r} in {url} has no {what} (it has {sorted(members)}); re-create the shard set"
            )
        if ext == "npy":
            arr = self._npy(url, key, data)
            if not self.fits:
                return arr
            img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
            return self._finish(fit_image(to_mode(img, self.shape[0]), self.shape[1], self.resize))
        return self._pil(url, key, ext, data)

    def _finish(self, img: Image.Image) -> np.ndarray:
        c, h, w = self.shape
        return np.asarray(img, dtype=np.uint8).reshape(h, w, c)

    def _npy(self, url: str, key: str, data: bytes) -> np.ndarray:
        c, h, w = self.native
        ok = self._npy_ok
        # Every sample of a set has the same header: a prefix match with the last validated one suffices.
        end = len(ok) if ok and data.startswith(ok) else self._npy_header(url, key, data)
        if len(data) - end != h * w * c:
            raise BadImage(f"{key}.npy in {url} has {len(data) - end} data bytes, expected {h * w * c}")
        return np.frombuffer(data, np.uint8, count=h * w * c, offset=end).reshape(h, w, c)

    def _npy_header(self, url: str, key: str, data: bytes) -> int:
        """Validate a .npy header against the manifest; returns the offset of the array data."""
        c, h, w = self.native
        if data[:6] != b"\x93NUMPY" or len(data) < 12 or data[6] not in (1, 2, 3):
            raise BadImage(f"{key}.npy in {url} is not a .npy file; re-create the shard set")
        head = 10 if data[6] == 1 else 12
        end = head + int.from_bytes(data[8:head], "little")
        # A regex, not ast.literal_eval (nor np.load, which uses it): concurrent calls from threads can
        # raise "SystemError: AST constructor recursion depth mismatch" on CPython 3.11 (cpython#106905),
        # and open_shards checks shards from a thread pool.
        meta = _NPY_HEADER.fullmatch(data[head:end].decode("latin1").strip())
        try:
            if meta is None:
                raise ValueError
            dtype, fortran = np.dtype(meta["descr"]), meta["fortran"] == "True"
            shape = tuple(int(d) for d in meta["shape"].replace(",", " ").split())
        except (TypeError, ValueError):
            raise BadImage(f"{key}.npy in {url} has a corrupt header; re-create the shard set") from None
        if dtype != np.uint8 or fortran or shape not in ((h, w, c), (h, w) if c == 1 else (h, w, c)):
            raise BadImage(
                f"{key}.npy in {url} holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, the "
                f"manifest says uint8 {(h, w, c)}; re-create the shard set"
            )
        self._npy_ok = data[:end]
        return end

    def _pil(self, url: str, key: str, ext: str, data: bytes) -> np.ndarray:
        c, h, w = self.shape
        try:
            with Image.open(io.BytesIO(data)) as im:
                if not self.fits:
                    arr = np.asarray(to_mode(im, c))
                else:
                    if im.format == "JPEG":
                        im.draft(im.mode, (DRAFT_OVERSAMPLE * w, DRAFT_OVERSAMPLE * h))
                    arr = self._finish(fit_image(to_mode(im, c), w, self.resize))
        except Image.UnidentifiedImageError:
            raise BadImage(f"{key}.{ext} in {url} is not an image (no decoder knows it)") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadImage(f"cannot decode {key}.{ext} in {url} ({e}); re-create the shard set") from None
        if arr.shape[:2] != (h, w):
            raise BadImage(
                f"{key}.{ext} in {url} is {arr.shape[1]}x{arr.shape[0]}, the manifest says {w}x{h}; "
                "re-create the shard set"
            )
        return arr.reshape(h, w, c)
