"""Image codecs of shard members: encode uint8 H×W×C arrays as ``npy`` / ``png`` / ``jpg`` bytes, and decode
them back, validated against the manifest's image shape.

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

from vaejob.shards.format import CHANNEL_MODES, DataError

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


# ------------------------------------------------------------------------------------------------ decode
class Decoder:
    """Decodes raw samples to uint8 (H, W, C) arrays, validated against the manifest's image shape."""

    def __init__(self, encoding: str, shape: tuple[int, int, int]) -> None:
        self.encoding, self.shape = encoding, shape
        self.wanted = frozenset((encoding, "cls"))
        self._npy_ok = b""  # header prefix already validated: identical for every sample

    def image(self, url: str, key: str, members: dict[str, bytes]) -> np.ndarray:
        data = members.get(self.encoding)
        if data is None:
            raise DataError(
                f"sample {key!r} in {url} has no .{self.encoding} member (it has {sorted(members)}); "
                "re-create the shard set"
            )
        return self._npy(url, key, data) if self.encoding == "npy" else self._pil(url, key, data)

    def _npy(self, url: str, key: str, data: bytes) -> np.ndarray:
        c, h, w = self.shape
        ok = self._npy_ok
        # Every sample of a set has the same header: a prefix match with the last validated one suffices.
        end = len(ok) if ok and data.startswith(ok) else self._npy_header(url, key, data)
        if len(data) - end != h * w * c:
            raise DataError(f"{key}.npy in {url} has {len(data) - end} data bytes, expected {h * w * c}")
        return np.frombuffer(data, np.uint8, count=h * w * c, offset=end).reshape(h, w, c)

    def _npy_header(self, url: str, key: str, data: bytes) -> int:
        """Validate a .npy header against the manifest; returns the offset of the array data."""
        c, h, w = self.shape
        if data[:6] != b"\x93NUMPY" or len(data) < 12 or data[6] not in (1, 2, 3):
            raise DataError(f"{key}.npy in {url} is not a .npy file; re-create the shard set")
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
            raise DataError(f"{key}.npy in {url} has a corrupt header; re-create the shard set") from None
        if dtype != np.uint8 or fortran or shape not in ((h, w, c), (h, w) if c == 1 else (h, w, c)):
            raise DataError(
                f"{key}.npy in {url} holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, the "
                f"manifest says uint8 {(h, w, c)}; re-create the shard set"
            )
        self._npy_ok = data[:end]
        return end

    def _pil(self, url: str, key: str, data: bytes) -> np.ndarray:
        c, h, w = self.shape
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im if im.mode == CHANNEL_MODES[c] else im.convert(CHANNEL_MODES[c]))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(
                f"cannot decode {key}.{self.encoding} in {url} ({e}); re-create the shard set"
            ) from None
        if arr.shape[:2] != (h, w):
            raise DataError(
                f"{key}.{self.encoding} in {url} is {arr.shape[1]}x{arr.shape[0]}, the manifest says {w}x{h}; "
                "re-create the shard set"
            )
        return arr.reshape(h, w, c)
