"""Storage I/O on a local path or an fsspec URL (s3://, gs://, memory://, ...): atomic writes, reads that
survive a flaky object store, and the errors of both as one line.

- Writes (``atomic_write_*``, ``open_write``): locally a temp file beside the target, fsynced, renamed. On an
  object store (s3, gs, az, memory) the final key is written directly: a PUT (multipart for big objects) is
  already all-or-nothing there, and a temp object would cost a copy + delete and could be orphaned by a kill;
  a failed streaming write aborts its upload, so nothing appears. Other fsspec filesystems keep temp + move.
- Reads of URLs (``open_read``) fetch ranges of ``CHUNK`` bytes in a background thread, ``AHEAD`` chunks ahead
  of the reader (the network overlaps the decoding), each range retried with exponential backoff
  (``configure(retries=, backoff_s=)``; ``data.io_retries`` / ``data.io_backoff_s`` in a training run). When the
  retries are spent: ``StorageError``, one line naming the URL and the error (a ``JobFailure``: exit 1).
- Credentials are never vaejob's business: s3fs / botocore read them from the environment, ~/.aws/config and
  credentials, or the instance; the endpoint of MinIO / Ceph from ``AWS_ENDPOINT_URL`` or ``endpoint_url`` in
  ~/.aws/config. ``check_access`` turns a missing bucket, wrong credentials or an unreachable endpoint into
  one ``StorageAccessError`` line before a job starts; messages are passed through ``redact``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec

from vaejob.cli import JobFailure, UsageError

T = TypeVar("T")

OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
CHUNK = 4 << 20  # bytes per range request: few requests per shard, little memory per reader
AHEAD = 2  # ranges fetched ahead of the reader
# Permanent errors: retrying cannot help.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, NotImplementedError)


class StorageError(JobFailure):
    """Storage failed after its retries (an endpoint gone, a network down): one line, exit 1."""


class StorageAccessError(UsageError):
    """A location that cannot be used as given (no such bucket, wrong credentials, no endpoint): exit 2."""


@dataclass
class RetryPolicy:
    retries: int = 5  # attempts after the first
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k

    def waits(self) -> list[float]:
        return [self.backoff_s * 2**k for k in range(self.retries)]


RETRY = RetryPolicy()


def configure(retries: int | None = None, backoff_s: float | None = None) -> None:
    """Process-wide retry policy of URL reads and writes (inherited by forked loader workers)."""
    if retries is not None:
        RETRY.retries = retries
    if backoff_s is not None:
        RETRY.backoff_s = backoff_s


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` without the user:password part of any URL in it (an endpoint's secret)."""
    return _USERINFO.sub("***@", text)


def error_text(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return redact(f"{type(e).__name__}: {text}" if text else type(e).__name__)


def with_retries(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, retried on transient errors with exponential backoff; then ``StorageError`` naming ``what``."""
    waits = RETRY.waits()
    for attempt in range(len(waits) + 1):
        try:
            return fn()
        except PERMANENT:
            raise
        except Exception as e:  # botocore / aiohttp / OSError: the object store's many ways to fail
            if attempt == len(waits):
                raise StorageError(
                    f"storage failed: {redact(what)}: {error_text(e)} (after {attempt + 1} tries over "
                    f"{sum(waits):.0f} s; data.io_retries / data.io_backoff_s set the retries)"
                ) from None
            time.sleep(waits[attempt])
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ paths
def is_url(path: str) -> bool:
    """True for fsspec URLs such as ``s3://bucket/x``; ``file://`` counts as local."""
    return "://" in path and not path.startswith("file://")


def is_object_store(path: str) -> bool:
    return is_url(path) and path.split("://", 1)[0] in OBJECT_STORES


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def join(root: str, *parts: str) -> str:
    if is_url(root):
        return posixpath.join(root, *parts)
    return os.path.join(local_path(root), *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(local_path(path))


def _fs(path: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(path)


def makedirs(path: str) -> None:
    if is_url(path):
        fs, p = _fs(path)
        fs.makedirs(p, exist_ok=True)
    else:
        os.makedirs(local_path(path), exist_ok=True)


def exists(path: str) -> bool:
    if is_url(path):
        fs, p = _fs(path)
        return with_retries(f"cannot check {path}", lambda: fs.exists(p))
    return os.path.exists(local_path(path))


def size(path: str) -> int:
    if is_url(path):
        fs, p = _fs(path)
        return int(with_retries(f"cannot stat {path}", lambda: fs.size(p)))
    return os.path.getsize(local_path(path))


def listdir(path: str) -> dict[str, int | None]:
    """Entries directly in ``path`` by name: size for files, None for directories; {} when it is absent.
    One listing request on object stores."""
    if not is_url(path):
        path = local_path(path)
        if not os.path.isdir(path):
            return {}
        return {
            e.name: (e.stat().st_size if e.is_file() else None)
            for e in os.scandir(path)
            if not e.is_symlink()
        }
    fs, p = _fs(path)

    def ls() -> list[dict[str, Any]]:
        fs.invalidate_cache(p)  # another process may have written here since
        try:
            return fs.ls(p, detail=True)
        except FileNotFoundError:
            return []

    entries = with_retries(f"cannot list {path}", ls)
    root = p.rstrip("/")
    return {
        str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: (
            int(e.get("size") or 0) if e.get("type") != "directory" else None
        )
        for e in entries
        if str(e["name"]).rstrip("/") != root
    }


def remove(path: str) -> None:
    """Remove a file or a directory tree, if there."""
    if is_url(path):
        fs, p = _fs(path)
        with contextlib.suppress(FileNotFoundError):
            with_retries(f"cannot remove {path}", lambda: fs.rm(p, recursive=True))
        return
    path = local_path(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


# ------------------------------------------------------------------------------------------------ reads
class RangeReader:
    """A URL read front to back in ``CHUNK`` ranges, fetched ``AHEAD`` ranges ahead by a thread, each range
    retried (``with_retries``). A sequential stream (not seekable): what tar shards and JSON files need."""

    def __init__(self, url: str, chunk: int = CHUNK, ahead: int = AHEAD) -> None:
        self.url, self.chunk = url, chunk
        self.fs, self.path = _fs(url)
        self.size = int(with_retries(f"cannot open {url}", lambda: self.fs.size(self.path)))
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.buf, self.pos = b"", 0
        self.thread = threading.Thread(target=self._fetch, daemon=True, name=f"read-ahead {url}")
        self.thread.start()

    def _fetch(self) -> None:
        try:
            for start in range(0, self.size, self.chunk):
                end = min(self.size, start + self.chunk)
                data = with_retries(
                    f"cannot read {self.url} bytes {start}-{end}",
                    lambda s=start, e=end: self.fs.cat_file(self.path, start=s, end=e),
                )
                if len(data) != end - start:
                    raise StorageError(
                        f"storage failed: {self.url} returned {len(data)} bytes for {start}-{end}"
                    )
                while not self.stop.is_set():
                    try:
                        self.chunks.put(data, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # handed to the reader, which raises it in its own thread
            with contextlib.suppress(queue.Full):
                self.chunks.put(e, timeout=1)

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        want = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        parts, have = [], 0
        while have < want:
            if not self.buf:
                item = self.chunks.get()
                if isinstance(item, BaseException):
                    raise item
                self.buf = item
            take = self.buf[: want - have]
            self.buf = self.buf[len(take) :]
            parts.append(take)
            have += len(take)
        self.pos += have
        return b"".join(parts)

    def readinto(self, target: memoryview) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stop.set()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_read(path: str) -> IO[bytes]:
    if is_url(path):
        return RangeReader(path)  # type: ignore[return-value]
    return open(local_path(path), "rb")


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


# ------------------------------------------------------------------------------------------------ writes
@contextlib.contextmanager
def open_write(path: str) -> Iterator[IO[bytes]]:
    """A binary stream that becomes ``path`` only when the block ends without an exception (see the module
    docstring for how, per kind of storage). Locally the file is fsynced before the rename."""
    if is_object_store(path) and not path.startswith("memory://"):
        fs, p = _fs(path)
        f = fs.open(p, "wb")  # s3fs: one PUT at close, or a multipart upload past its block size
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts the multipart upload: nothing was committed
            f.closed = True  # and never will be (a buffered file's __del__ would close = commit it)
            raise
        try:
            f.close()  # s3fs retries its own requests; a half-done multipart upload is not retried whole
        except Exception as e:
            with contextlib.suppress(Exception):
                f.discard()
            f.closed = True
            raise StorageError(f"storage failed: cannot write {redact(path)}: {error_text(e)}") from None
        return
    if is_object_store(path):  # memory:// commits at open: collect, then one put
        buf = io.BytesIO()
        yield buf
        atomic_write_bytes(path, buf.getvalue())
        return
    if is_url(path):
        fs, p = _fs(path)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open(tmp, "wb") as f:
                yield f
            fs.mv(tmp, p)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(tmp)
            raise
        return
    path = local_path(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either its old content or all of ``data`` (``open_write``); on an
    object store the whole PUT is retried on transient errors."""
    if is_object_store(path):
        fs, p = _fs(path)
        with_retries(f"cannot write {path}", lambda: fs.pipe_file(p, data))
        return
    with open_write(path) as f:
        f.write(data)


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


# ------------------------------------------------------------------------------------------------ access
def check_access(url: str, what: str) -> None:
    """Before a job starts: can ``url``'s bucket / container be reached with the credentials at hand?
    Raises ``StorageAccessError`` with one line (no such bucket, access denied, no endpoint)."""
    if not is_url(url):
        return
    fs, p = _fs(url)
    bucket = p.split("/", 1)[0]
    hint = ""
    if url.startswith(("s3://", "s3a://")):
        hint = (
            " (credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE or "
            "~/.aws/credentials; MinIO / Ceph endpoint: AWS_ENDPOINT_URL or endpoint_url in ~/.aws/config)"
        )
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StorageAccessError(
            f"{what} {redact(url)}: bucket {bucket!r} does not exist; create it or fix the URL"
        ) from None
    except PermissionError as e:
        raise StorageAccessError(f"{what} {redact(url)}: access denied ({error_text(e)}){hint}") from None
    except Exception as e:  # no credentials, no endpoint, no network
        raise StorageAccessError(f"{what} {redact(url)}: cannot reach it ({error_text(e)}){hint}") from None
