"""Bring your own data: existing WebDataset tars indexed in place (``vaejob.shard --index``), and the loader,
training and evaluation on them at any image size. Real tars written with ``webdataset.ShardWriter``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.foreign import write_foreign_shards
from tests.util import (
    flat,
    keys_of,
    launch_cmd,
    loader,
    metrics,
    module_cmd,
    one_line_error,
    run,
    tiny_overrides,
)
from vaejob.shard import main as shard_main
from vaejob.shards import DataError, open_shards
from vaejob.shards.codec import fit_image, to_mode

SIZE = 16


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Three img2dataset-style tars (60 samples: JPEG / PNG / WebP of 10 modes and mixed sizes, 3 broken),
    indexed in place."""
    root = tmp_path_factory.mktemp("foreign") / "tars"
    written = write_foreign_shards(root)
    assert shard_main(["--index", str(root), "--workers", "2"]) == 0
    return root, written


def read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def split_keys(root: Path, split: str) -> list[str]:
    """The keys a split holds, read back with plain webdataset (manifest order)."""
    m, out = read_manifest(root), []
    for s in m["splits"][split]["shards"]:
        keys = [x["__key__"] for x in wds.WebDataset(str(root / s["name"]), shardshuffle=False)]
        out += [keys[i] for i in s.get("samples", range(len(keys)))]
    return out


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------- index
def test_index_writes_a_manifest_beside_the_tars_and_lists_what_it_skipped(foreign, tmp_path, capsys) -> None:
    root, written = foreign
    m = read_manifest(root)
    tars_before = {p.name: p.read_bytes() for p in root.glob("*.tar")}
    assert m["format"] == "vaejob-shards/1" and m["encoding"] == "image" and m["image"] is None
    train, val = split_keys(root, "train"), split_keys(root, "val")
    assert sorted(train + val) == sorted(written["good"])  # every good sample in exactly one split
    assert not set(train) & set(val) and val  # split by key hash (default fraction 0.1)
    skipped = {s["path"].split("#", 1)[1]: s["reason"] for s in m["skipped"]}
    assert sorted(skipped) == sorted(written["broken"])
    assert "truncated" in skipped["part.2/img-000011"].lower()
    assert "not an image" in skipped["part.2/img-000023"]
    assert "no image member" in skipped["part.1/img-000031"]
    assert m["labels"] == {"num_classes": 3, "names": ["0", "1", "2"]}
    images = m["images"]
    assert images["count"] == len(written["good"]) and images["shorter_side"]["min"] == 5
    assert set(images["modes"]) == {"RGB", "L", "CMYK", "RGBA", "P", "LA", "I;16"}
    assert images["exts"]["jpg"] and images["exts"]["png"] and images["exts"]["webp"]
    for entry in m["splits"]["val"]["shards"]:
        assert entry["total"] == 20 and len(entry["samples"]) == entry["count"] < 20
        assert entry["name"].startswith("data-") and entry["bytes"] == (root / entry["name"]).stat().st_size

    # Deterministic whatever --workers, and the tars are never touched.
    again = copy_set(root, tmp_path / "again")
    (again / "manifest.json").unlink()
    assert shard_main(["--index", str(again), "--workers", "1"]) == 0
    same = (again / "manifest.json").read_text().replace(str(again), str(root))
    assert same == (root / "manifest.json").read_text()  # only the --index spec differs
    assert {p.name: p.read_bytes() for p in root.glob("*.tar")} == tars_before
    capsys.readouterr()
    assert shard_main(["--index", str(again)]) == 2  # an index is there: --overwrite replaces it
    assert "pass --overwrite" in capsys.readouterr().err


def test_index_by_named_shards_pattern_and_wids(foreign, tmp_path) -> None:
    root, written = foreign
    out = tmp_path / "named"
    pattern = f"{root}/data-{{00000..00002}}.tar"
    assert shard_main(["--index", pattern, "--val-shards", "data-00002.tar", "--out", str(out)]) == 0
    m = read_manifest(out)
    assert [s["name"] for s in m["splits"]["val"]["shards"]] == [str(root / "data-00002.tar")]  # absolute
    assert {s["name"] for s in m["splits"]["train"]["shards"]} == {
        str(root / f"data-0000{i}.tar") for i in (0, 1)
    }
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == len(written["good"])

    wids = tmp_path / "wids" / "index.json"  # webdataset's wids shard index, urls relative to it
    wids.parent.mkdir()
    shardlist = [{"url": os.path.relpath(p, wids.parent), "nsamples": 20} for p in sorted(root.glob("*.tar"))]
    wids.write_text(
        json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shardlist})
    )
    assert shard_main(["--index", str(wids), "--out", str(tmp_path / "from-wids")]) == 0
    expected = read_manifest(root)["splits"]
    for split in expected.values():
        for entry in split["shards"]:
            entry["name"] = str(root / entry["name"])
    assert read_manifest(tmp_path / "from-wids")["splits"] == expected


def test_a_read_only_location_takes_out(foreign, tmp_path, capsys) -> None:
    root, _ = foreign
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is what stops it
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ro)]).returncode == 0
    if not mounted and os.geteuid() == 0:
        pytest.skip("cannot mount a tmpfs to make a read-only location")
    try:
        for p in root.glob("*.tar"):
            shutil.copy(p, ro / p.name)
        if mounted:
            assert subprocess.run(["mount", "-o", "remount,ro", str(ro)]).returncode == 0
        else:
            ro.chmod(0o555)
        capsys.readouterr()
        assert shard_main(["--index", str(ro)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "read-only" in err and "--out" in err, err
        out = tmp_path / "index"
        assert shard_main(["--index", str(ro), "--out", str(out)]) == 0
        shards = open_shards(str(out), image_size=SIZE)
        assert all(u.startswith(str(ro)) for u in shards.split("train").urls)
        assert len(flat(keys_of(loader(shards, num_workers=0)))) == len(loader(shards)) * 8
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])
        else:
            ro.chmod(0o755)


def test_tars_without_a_manifest_point_at_index(foreign, tmp_path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(foreign[0] / "data-00000.tar", bare)
    with pytest.raises(DataError) as e:
        open_shards(str(bare))
    one_line_error(e, "not a shard set", "python -m vaejob.shard --index")


# ----------------------------------------------------------------------------------------------- loader
def reference_image(data: bytes, mode: str) -> np.ndarray:
    """An independent full decode (no JPEG draft) brought to SIZE by ``mode``."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(fit_image(to_mode(im, 3), SIZE, mode)).reshape(SIZE, SIZE, 3)


@pytest.mark.parametrize("mode", ["center_crop", "resize", "pad"])
def test_loader_brings_every_image_to_the_size(foreign, mode) -> None:
    root, written = foreign
    members = {}
    for p in sorted(root.glob("*.tar")):
        for x in wds.WebDataset(str(p), shardshuffle=False):
            ext = next((e for e in ("jpg", "png", "webp") if e in x), None)
            if ext:
                members[x["__key__"]] = x[ext]
    shards = open_shards(str(root), image_size=SIZE, resize=mode)
    assert shards.image_shape == (3, SIZE, SIZE) and shards.native_shape is None
    seen = []
    for split, workers in (("train", 2), ("val", 0)):
        for batch in loader(shards, split, num_workers=workers, raw=True):
            assert batch["image"].shape == (8, 3, SIZE, SIZE)
            for key, image, label, ok in zip(
                batch["key"], batch["image"], batch["label"], batch["valid"], strict=True
            ):
                if not ok:
                    continue
                got = image.permute(1, 2, 0).numpy().astype(int)
                diff = np.abs(got - reference_image(members[key], mode)).mean()
                assert diff < 6, (key, written["good"][key], diff)  # JPEG draft decoding: a few grey levels
                assert int(label) == written["good"][key][4]
                seen.append(key)
    m = read_manifest(root)
    assert len(set(seen)) == len(seen) == m["splits"]["train"]["count"] // 8 * 8 + m["splits"]["val"]["count"]
    grey = loader(open_shards(str(root), image_size=SIZE, channels=1), num_workers=0)
    assert next(iter(grey))["image"].shape == (8, 1, SIZE, SIZE)


def test_two_ranks_exact_val_and_exact_resume_on_indexed_shards(foreign) -> None:
    root, _ = foreign
    shards = open_shards(str(root), image_size=SIZE)
    m = read_manifest(root)
    per_rank = [
        keys_of(loader(shards, rank=r, world_size=2, num_workers=2, seed=4, batch_size=4)) for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == m["splits"]["train"]["count"] // 8  # equal batch counts
    assert not set(flat(per_rank[0])) & set(flat(per_rank[1]))
    val = [
        flat(keys_of(loader(shards, "val", rank=r, world_size=2, num_workers=2, batch_size=4)))
        for r in (0, 1)
    ]
    assert sorted(val[0] + val[1]) == sorted(split_keys(root, "val"))  # every val sample exactly once

    full = keys_of(loader(shards, rank=1, world_size=2, num_workers=2, seed=4, batch_size=4, epoch=1))
    first = loader(shards, rank=1, world_size=2, num_workers=2, seed=4, batch_size=4, epoch=1)
    assert keys_of(first, limit=2) == full[:2]
    resumed = loader(shards, rank=1, world_size=2, num_workers=2, batch_size=4)
    resumed.load_state_dict(first.state_dict())
    assert keys_of(resumed) == full[2:]


IMAGE_ENDS = (".jpg", ".png", ".webp")


def member_key(name: str) -> str:
    """webdataset's key of a member: its name up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def rewrite_member(tar_path: Path, key: str, payload: bytes) -> None:
    """Overwrite a member's bytes in place (same length): a tar that changed after it was indexed."""
    with tarfile.open(tar_path) as tar:
        member = next(
            m for m in tar.getmembers() if member_key(m.name) == key and m.name.endswith(IMAGE_ENDS)
        )
    blob = bytearray(tar_path.read_bytes())
    blob[member.offset_data : member.offset_data + member.size] = payload.ljust(member.size, b"\0")[
        : member.size
    ]
    tar_path.write_bytes(bytes(blob))


def corrupt_a_train_image(root: Path) -> str:
    """Garble one picked train image that is not its shard's first (the head check reads the first)."""
    m = read_manifest(root)
    entry = m["splits"]["train"]["shards"][0]
    keys = [x["__key__"] for x in wds.WebDataset(str(root / entry["name"]), shardshuffle=False)]
    picks = entry.get("samples", list(range(entry["total"])))
    key = keys[picks[3]]
    rewrite_member(root / entry["name"], key, b"garbage, not an image any more")
    return key


def test_an_image_that_broke_after_indexing_is_skipped_counted_and_batches_stay_full(
    foreign, tmp_path, caplog
) -> None:
    root = copy_set(foreign[0], tmp_path / "set")
    key = corrupt_a_train_image(root)
    shards = open_shards(str(root), image_size=SIZE)  # sizes unchanged: only reading the image tells
    clean = open_shards(str(foreign[0]), image_size=SIZE)
    for workers in (0, 2):
        it = loader(shards, num_workers=workers, batch_size=4)
        batches = keys_of(it)
        expected = keys_of(loader(clean, num_workers=workers, batch_size=4))
        assert [len(b) for b in batches] == [4] * len(expected)  # the slot repeats a good sample of its batch
        assert key not in flat(batches) and it.last_epoch_skipped == 1
        assert sum(a != b for a, b in zip(flat(batches), flat(expected), strict=True)) == 1
    assert "skipped a sample" in caplog.text and key in caplog.text
    with pytest.raises(DataError) as e:
        open_shards(str(root), image_size=SIZE, verify=True)
    one_line_error(e, "sha256 mismatch", "re-run python -m vaejob.shard --index")

    grown = root / read_manifest(root)["splits"]["train"]["shards"][1]["name"]
    grown.write_bytes(grown.read_bytes() + bytes(10240))
    with pytest.raises(DataError) as e:
        open_shards(str(root), image_size=SIZE)
    one_line_error(e, "changed since it was indexed", grown.name, "re-run python -m vaejob.shard --index")


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_two_process_training_and_evaluation_on_indexed_tars(foreign, tmp_path) -> None:
    root = copy_set(foreign[0], tmp_path / "set")
    bad = corrupt_a_train_image(root)
    run_dir = tmp_path / "run"
    over = tiny_overrides(
        str(root),
        run_dir,
        **{"data.image_size": SIZE, "data.resize": "pad", "train.batch_size": 4, "train.max_steps": 12},
    )
    cp = run(launch_cmd(2) + over, timeout=400)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "skipped a sample" in cp.stderr and bad in cp.stderr
    data = metrics(run_dir, "data")
    per_epoch = read_manifest(root)["splits"]["train"]["count"] // 8
    assert [r["epoch"] for r in data] == list(range(12 // per_epoch))
    assert all(r["skipped_samples"] == 1 for r in data)  # the broken image is in one rank's slice per epoch
    assert metrics(run_dir, "val")[-1]["count"] == read_manifest(root)["splits"]["val"]["count"]

    cp = run(module_cmd("vaejob.evaluate", 1) + ["--run", str(run_dir), "--iw-samples", "4"], timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    record = json.loads(cp.stdout[cp.stdout.index("{") :])
    assert record["count"] == read_manifest(root)["splits"]["val"]["count"]

    bare = run([*launch_cmd(1), *over[:1], f"run.dir={tmp_path / 'r2'}"], timeout=120)
    assert bare.returncode == 2 and "data.image_size" in bare.stderr.strip().splitlines()[-1]
