"""Output-directory safety for ``vaejob.shard``: refuse a directory we must not write into, and clear the
previous set (manifest first, so a half-removed set never looks complete) before writing a new one."""

from __future__ import annotations

import os
import re
import shutil

from vaejob import storage
from vaejob.cli import UsageError
from vaejob.shards.format import MANIFEST, PARTS

_SHARD_RE = re.compile(r"(train|val)-\d{6}\.tar")
_PART_RE = re.compile(r"part-\d+\.json")


def _is_ours(out: str, entry: str) -> bool:
    path = os.path.join(out, entry)
    if entry == PARTS and os.path.isdir(path):
        return all(_PART_RE.fullmatch(e) or e.endswith(".tmp") for e in os.listdir(path))
    return os.path.isfile(path) and (
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
        raise UsageError(
            f"--out {out!r}: sharding writes to a local directory; copy the finished set to storage afterwards"
        )
    created = _missing_dirs(out)
    entries = [] if created else sorted(os.listdir(out))
    if not entries:
        return created
    foreign = [e for e in entries if not _is_ours(out, e)]
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
    manifest = os.path.join(out, MANIFEST)
    if os.path.exists(manifest):
        os.unlink(manifest)  # first: a half-removed set must never look complete
    if not os.path.isdir(out):
        return
    if own is None:
        for entry in os.listdir(out):
            if entry == PARTS:
                shutil.rmtree(os.path.join(out, entry))
            elif _SHARD_RE.fullmatch(entry) or entry.endswith(".tmp"):
                os.unlink(os.path.join(out, entry))
        return
    for path in [os.path.join(out, n) for n in own] + [os.path.join(out, PARTS, f"part-{task_index}.json")]:
        if os.path.exists(path):
            os.unlink(path)


def remove_stale_shards(out: str, keep: set[str]) -> None:
    """Shards left over from an earlier run into the same directory, and temp files."""
    for entry in os.listdir(out):
        if (_SHARD_RE.fullmatch(entry) and entry not in keep) or entry.endswith(".tmp"):
            os.unlink(os.path.join(out, entry))


def discard(out: str, names: list[str], created: list[str]) -> None:
    """Undo a run refused after writing: its shards, then the directories it created (innermost first)."""
    for name in names:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.unlink(path)
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:  # not empty: something else is in it now, keep it
            break
