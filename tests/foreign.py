"""Foreign data written the way users' pipelines write it: img2dataset-style WebDataset tars (with
``webdataset.ShardWriter``) and Hugging Face datasets (``datasets.Dataset.from_dict``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# (PIL mode, member extension) of the images, in turn: JPEG and PNG (and WebP) of every mode users have.
KINDS = [
    ("RGB", "jpg"),
    ("L", "jpg"),
    ("CMYK", "jpg"),
    ("RGB", "png"),
    ("RGBA", "png"),
    ("L", "png"),
    ("P", "png"),
    ("LA", "png"),
    ("I;16", "png"),
    ("RGB", "webp"),
]


def picture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth picture with an edge (compresses like a photo, unlike noise)."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.random(3) * 200
    img = base + 40 * np.sin(x[..., None] / (3 + 5 * rng.random(3))) + 30 * (y[..., None] > h / 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, mode: str, ext: str) -> bytes:
    img = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257).convert("I;16")
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "RGBA" or mode == "LA":
        img = img.convert(mode)
        alpha = np.full(arr.shape[:2], 255, np.uint8)
        alpha[: arr.shape[0] // 3] = 0  # a transparent band
        img.putalpha(Image.fromarray(alpha))
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(
        buf,
        format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext],
        **({"quality": 90} if ext != "png" else {}),
    )
    return buf.getvalue()


def write_foreign_shards(
    out: Path, n: int = 60, per_shard: int = 20, seed: int = 0, bad: bool = True
) -> dict[str, Any]:
    """img2dataset-style shards ``out/data-00000.tar ...``: ``KEY.jpg|png|webp`` + ``.cls`` + ``.txt`` +
    ``.json``, images of mixed sizes and modes, keys with slashes and dots in their directories. With
    ``bad``: one truncated JPEG, one ``.jpg`` that is text, one sample with no image, one 5x7 image.
    Returns what was written: key -> (mode, ext, w, h, label) and the keys that must be skipped."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[str, str, int, int, int]] = {}
    broken: dict[str, str] = {}
    with wds.ShardWriter(str(out / "data-%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for k in range(n):
            key = f"part.{k % 3}/img-{k:06d}"
            mode, ext = KINDS[k % len(KINDS)]
            w, h = int(rng.integers(20, 64)), int(rng.integers(20, 64))
            if bad and k == 7:
                w, h = 5, 7  # smaller than any crop: up-scaled
            data = encode(picture(rng, w, h), mode, ext)
            sample: dict[str, Any] = {
                "__key__": key,
                "cls": str(k % 3),
                "txt": f"caption {k}",
                "json": {"k": k},
            }
            if bad and k == 11:
                ext, data = "jpg", encode(picture(rng, w, h), "RGB", "jpg")
                data = data[: len(data) // 2]  # truncated
                broken[key] = "truncated"
            elif bad and k == 23:
                ext, data = "jpg", b"this is not an image\n"
                broken[key] = "not an image"
            if bad and k == 31:
                broken[key] = "no image member"
            else:
                sample[ext] = data
            if key not in broken:
                written[key] = (mode, ext, w, h, k % 3)
            sink.write(sample)
    return {"good": written, "broken": broken}
