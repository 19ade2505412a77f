"""Output-directory safety for ``vaejob.shard``: refuse a directory (or object-store prefix) we must not write
into, and clear the previous set (manifest first, so a half-removed set never looks complete) before writing
a new one. Local paths and fsspec URLs alike, through ``vaejob.storage``."""

from __future__ import annotations

import os
import re

from vaejob import storage
from vaejob.cli import UsageError
from vaejob.shards.format import MANIFEST, PARTS

_SHARD_RE = re.compile(r"(train|val)-\d{6}\.tar")
_PART_RE = re.compile(r"part-\d+\.json")


def _is_ours(out: str, entry: str, size: int | None) -> bool:
    if entry == PARTS and size is None:  # a directory
        return all(
            _PART_RE.fullmatch(e) or e.endswith(".tmp") for e in storage.listdir(storage.join(out, PARTS))
        )
    return size is not None and (
        entry == MANIFEST or entry.endswith(".tmp") or bool(_SHARD_RE.fullmatch(entry))
    )


def _missing_dirs(out: str) -> list[str]:
    """The directories writing into ``out`` creates, outermost first; refuse when the nearest existing
    ancestor (or ``out`` itself) is not a directory we may create entries in, so ``makedirs`` cannot fail."""
    missing: list[str] = []
    path = out.rstrip(os.sep) or os.sep  # "file/" would fail lstat with ENOTDIR and look missing
    while not os.path.lexists(path):  # lexists: a dangling symlink is in the way, not missing
        missing.append(path)
        parent = os.path.dirname(path) or os.curdir
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        where = f"{out!r} cannot be created: {path!r} is" if missing else f"{out!r} is"
        raise UsageError(f"--out {where} not a directory; choose another --out")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out!r}: no permission to create files in {path!r}; choose another --out")
    return missing[::-1]


def check_out_dir(out: str, overwrite: bool, task_mode: bool) -> list[str]:
    """Refuse (before anything is written) an output directory we must not write into; returns the
    directories the run will create (for ``discard``)."""
    if storage.is_url(out):
        storage.check_access(out, "--out")  # no bucket or no credentials: one line before any work
        created: list[str] = []
    else:
        created = _missing_dirs(out)
    listed = {} if created else storage.listdir(out)
    entries = sorted(listed)
    if not entries:
        return created
    foreign = [e for e in entries if not _is_ours(out, e, listed[e])]
    if task_mode:
        # Other array tasks write into the same directory: only foreign files or a finished set stop us.
        if foreign:
            raise UsageError(
                f"--out {out!r} holds files vaejob.shard did not write ({foreign[0]!r}): choose an empty --out"
            )
        if MANIFEST in entries and not overwrite:
            raise UsageError(
                f"--out {out!r} already holds a complete shard set: pass --overwrite, or choose another --out"
            )
        return created
    if not overwrite:
        raise UsageError(
            f"--out {out!r} is not empty: pass --overwrite to replace its shard set, or choose another --out"
        )
    if foreign:
        raise UsageError(
            f"--out {out!r} holds files vaejob.shard did not write ({foreign[0]!r}): refusing to --overwrite, "
            "choose another --out"
        )
    return created


def clear_out(out: str, own: list[str] | None, task_index: int | None) -> None:
    """Remove the previous set (all of it, or only this array task's shards), manifest first."""
    storage.remove(storage.join(out, MANIFEST))  # first: a half-removed set must never look complete
    if own is None:
        for entry in storage.listdir(out):
            if entry == PARTS or _SHARD_RE.fullmatch(entry) or entry.endswith(".tmp"):
                storage.remove(storage.join(out, entry))
        return
    for name in [*own, storage.join(PARTS, f"part-{task_index}.json")]:
        storage.remove(storage.join(out, name))
    remove_temps(out, own)


def remove_temps(out: str, names: list[str]) -> None:
    """Local temp files of these shards (``storage.open_write``'s ``.NAME.*.tmp``) that a killed writer left."""
    prefixes = tuple(f".{n}." for n in names)
    for entry in storage.listdir(out):
        if entry.endswith(".tmp") and entry.startswith(prefixes):
            storage.remove(storage.join(out, entry))


def remove_stale_shards(out: str, keep: set[str]) -> None:
    """Shards left over from an earlier run into the same directory, and temp files."""
    for entry in storage.listdir(out):
        if (_SHARD_RE.fullmatch(entry) and entry not in keep) or entry.endswith(".tmp"):
            storage.remove(storage.join(out, entry))


def discard(out: str, names: list[str], created: list[str]) -> None:
    """Undo a run refused after writing: its shards, then the directories it created (innermost first)."""
    for name in names:
        storage.remove(storage.join(out, name))
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:  # not empty: something else is in it now, keep it
            break
