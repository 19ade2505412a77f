"""Atomic writes and reads on a local path or an fsspec URL (s3://, gs://, memory://, ...).

Every file vaejob produces (manifests, checkpoints metadata, sample batches, plots, eval JSON) goes through
here, so a crash mid-write never leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from typing import IO, Any

import fsspec


def is_url(path: str) -> bool:
    """True for fsspec URLs such as ``s3://bucket/x``; ``file://`` counts as local."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def join(root: str, *parts: str) -> str:
    if is_url(root):
        return posixpath.join(root, *parts)
    return os.path.join(local_path(root), *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(local_path(path))


def makedirs(path: str) -> None:
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        fs.makedirs(p, exist_ok=True)
    else:
        os.makedirs(local_path(path), exist_ok=True)


def exists(path: str) -> bool:
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.exists(local_path(path))


def size(path: str) -> int:
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.size(p))
    return os.path.getsize(local_path(path))


def open_read(path: str) -> IO[bytes]:
    if is_url(path):
        return fsspec.open(path, "rb").open()
    return open(local_path(path), "rb")


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a temp name beside ``path`` then rename it into place.

    Locally the temp file is fsynced before ``os.replace`` (atomic on POSIX). On object stores an upload is
    already all-or-nothing, so the temp object is moved (copy + delete) to its final key.
    """
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        parent = posixpath.dirname(p)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, p)
        return
    path = local_path(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (no-op on object stores)."""
    if is_url(path):
        return
    fd = os.open(local_path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
