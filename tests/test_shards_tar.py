"""The tar reader and writer of `vaejob.shards.tar` against Python's `tarfile`."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from vaejob.shards.tar import TarStream, TarWriter, iter_samples


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reader_handles_long_names_and_directories(fmt: int) -> None:
    """Other writers' tars: pax / GNU long-name headers and directory entries are read like tarfile does."""
    keys = ["short", "x" * 120, "d/inner"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_dir("d"))
        for i, key in enumerate(keys):
            for ext, payload in (("npy", bytes([i]) * (700 + i)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    buf.seek(0)
    tar = TarStream(buf, "mem.tar", chunk=1024)  # small buffer: exercises refills
    got = list(iter_samples(tar, "mem.tar", 0, 3, 3, frozenset({"npy", "cls"})))
    assert [k for k, _ in got] == keys
    assert [(s["npy"], int(s["cls"])) for _, s in got] == [(bytes([i]) * (700 + i), i) for i in range(3)]


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_tar_writer_matches_tarfile() -> None:
    members = [("k-1.npy", b"x" * 1000), ("k-1.cls", b"3"), ("a" * 80 + ".json", b"{}"), ("e.npy", b"")]
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                0,
                0o644,
                0,
                0,
                "",
                "",
            )
            tar.addfile(info, io.BytesIO(data))
    ours = io.BytesIO()
    writer = TarWriter(ours)  # type: ignore[arg-type]
    for name, data in members:
        writer.add(name, data)
    writer.close()
    assert ours.getvalue() == ref.getvalue()
    assert (
        writer.pos == len(ref.getvalue())
        and writer.sha.hexdigest() == hashlib.sha256(ref.getvalue()).hexdigest()
    )
