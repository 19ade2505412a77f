"""Any folder of images: ``imagefolder:DIR`` (labels = the immediate subfolder names, when there are any)."""

from __future__ import annotations

import os
import re

from vaejob.shards.sources.base import Loaded, Source, SourceError, read_image, sanitize_key

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


def folder_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.abspath(path))) or "imagefolder"


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
        arr = read_image(self.where(i), self.draft_size)
        return arr, (self.labels[i] if self.labels is not None else None), None
