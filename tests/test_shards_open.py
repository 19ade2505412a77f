"""`vaejob.shards.open_shards` fails fast, with one line naming the file, on every damaged or edited set."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.util import loader, manifest, one_line_error
from vaejob.loader import make_loader
from vaejob.shards import DataError, open_shards


@pytest.fixture
def copy(tiny_shards: str, tmp_path: Path) -> Path:
    dst = tmp_path / "set"
    shutil.copytree(tiny_shards, dst)
    return dst


def edit_manifest(root: Path, fn: Any) -> None:
    m = manifest(root)
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_not_a_shard_set(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        open_shards(str(tmp_path / "nowhere"))
    one_line_error(e, "not a shard set", "manifest.json", "python -m vaejob.shard")


def test_missing_shard(copy: Path) -> None:
    (copy / "val-000001.tar").unlink()
    with pytest.raises(DataError) as e:
        make_loader(str(copy), "train", 8)  # any split: the whole set is checked before training
    one_line_error(e, "missing shard", "val-000001.tar")


def test_truncated_shard(copy: Path) -> None:
    path = copy / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DataError) as e:
        open_shards(str(copy))
    one_line_error(e, "train-000002.tar", "bytes", "manifest says")


@pytest.mark.parametrize("field", ["count", "bytes", "format"])
def test_tampered_manifest(copy: Path, field: str) -> None:
    def tamper(m: dict[str, Any]) -> None:
        if field == "format":
            m["format"] = "vaejob-shards/99"
        else:
            m["splits"]["train"]["shards"][1][field] += 1

    edit_manifest(copy, tamper)
    with pytest.raises(DataError) as e:
        open_shards(str(copy))
    one_line_error(
        e, *{"count": ["count"], "bytes": ["train-000001.tar"], "format": ["manifest format"]}[field]
    )


@pytest.mark.parametrize(
    "where, value",
    [
        ("splits.train.shards[1].count", -400),
        ("splits.train.shards[1].count", 0),  # the writers never list an empty shard
        ("splits.train.shards[1].bytes", -1),
        ("splits.val.count", -5),
        ("labels.num_classes", -1),
    ],
)
def test_impossible_number_in_the_manifest(copy: Path, where: str, value: int) -> None:
    def tamper(m: dict[str, Any]) -> None:
        if where == "labels.num_classes":
            m["labels"]["num_classes"] = value
        elif where == "splits.val.count":
            m["splits"]["val"]["count"] = value
        else:
            train, field = m["splits"]["train"], where.rsplit(".", 1)[1]
            if field == "count":  # keep the split's sum consistent: only the entry itself is wrong
                train["count"] += value - train["shards"][1]["count"]
            train["shards"][1][field] = value

    edit_manifest(copy, tamper)
    with pytest.raises(DataError) as e:
        open_shards(str(copy))
    one_line_error(e, str(copy / "manifest.json"), f"{where} is {value}", "re-create the shard set")


def test_corrupt_first_header(copy: Path) -> None:
    path = copy / "train-000000.tar"
    blob = bytearray(path.read_bytes())
    blob[124:136] = b"77777777777\0"  # size field, checksum left as it was
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:
        open_shards(str(copy))
    one_line_error(e, "corrupt tar header", "train-000000.tar", "byte 0")


def test_damage_inside_a_shard(copy: Path) -> None:
    """Damage past the first sample is found by verify=True before training, else while reading (one line)."""
    path = copy / "train-000003.tar"
    with tarfile.open(path) as tar:
        at = tar.getmembers()[10].offset  # the header of a later member
    blob = bytearray(path.read_bytes())
    blob[at + 2] ^= 0x20  # its name
    path.write_bytes(bytes(blob))
    open_shards(str(copy))  # sizes and first samples are fine
    with pytest.raises(DataError) as e:
        open_shards(str(copy), verify=True)
    one_line_error(e, "sha256 mismatch", "train-000003.tar")
    with pytest.raises(DataError) as e:
        list(loader(str(copy), num_workers=2))
    one_line_error(e, "corrupt tar header", "train-000003.tar")


def test_shard_with_fewer_samples_than_its_manifest_entry(copy: Path) -> None:
    def tamper(m: dict[str, Any]) -> None:  # consistent counts: only reading the shard can tell
        m["splits"]["val"]["shards"][0]["count"] += 1
        m["splits"]["val"]["count"] += 1

    edit_manifest(copy, tamper)
    with pytest.raises(DataError) as e:
        list(loader(str(copy), "val", batch_size=4, num_workers=2))
    one_line_error(e, "val-000000.tar", "manifest entry says")
