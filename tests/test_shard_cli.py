"""`vaejob.shard` on real files: every source, determinism, read-back with webdataset, bad input, job arrays."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.foreign import write_foreign_shards
from tests.util import manifest, write_shard_set
from vaejob.shard import main
from vaejob.shards.plan import in_val
from vaejob.shards.sources import FASHION_MNIST_NAMES, sanitize_key

KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,80}")


# --------------------------------------------------------------------------------------------- helpers


def shard(out: Path, *args: str, workers: int = 1) -> dict:
    """Shard in-process into ``out`` and return the manifest."""
    return manifest(write_shard_set(*args, out=out, workers=workers))


def read_back(out: Path, split: str) -> list[dict]:
    """Samples of a split as plain webdataset decodes them, in shard order."""
    urls = [
        str(out / s["name"])
        for s in json.loads((out / "manifest.json").read_text())["splits"][split]["shards"]
    ]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())


def file_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def check_set(out: Path, shape: tuple[int, int, int]) -> dict[str, list[dict]]:
    """The manifest agrees with the files and with what webdataset reads back; returns the samples by split."""
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "vaejob-shards/1"
    assert (m["image"]["height"], m["image"]["width"], m["image"]["channels"]) == shape
    samples = {}
    for split in ("train", "val"):
        for s in m["splits"][split]["shards"]:
            data = (out / s["name"]).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (s["bytes"], s["sha256"])
        samples[split] = read_back(out, split)
        assert len(samples[split]) == m["splits"][split]["count"]
        assert [len(read_back_shard(out / s["name"])) for s in m["splits"][split]["shards"]] == [
            s["count"] for s in m["splits"][split]["shards"]
        ]
        for smp in samples[split]:
            assert KEY_RE.fullmatch(smp["__key__"])
            img = smp["npy"]
            assert img.shape == shape and img.dtype == np.uint8
            if m["labels"] is not None:
                assert 0 <= smp["cls"] < m["labels"]["num_classes"]
            if m["factors"] is not None:
                assert sorted(smp["json"]) == m["factors"]
    keys = [s["__key__"] for split in samples.values() for s in split]
    assert len(keys) == len(set(keys))
    return samples


def read_back_shard(path: Path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))


def write_idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def make_idx_dir(root: Path, n_train: int = 12, n_test: int = 5, side: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / name, arr)
    return arrays


def make_cifar_dir(root: Path, per_batch: int = 2, n_test: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    batches = {f"data_batch_{k}": per_batch for k in range(1, 6)} | {"test_batch": n_test}
    root.mkdir(parents=True)
    datas = []
    for name, n in batches.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f)
        datas.append(data)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return np.concatenate(datas[:5]), datas[5]


def make_imagefolder(root: Path) -> None:
    """Two classes, a nested subfolder, several formats, one non-square, one corrupt, one non-image file."""
    rng = np.random.default_rng(3)
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "cats" / "a.png")
    wide = np.zeros((20, 60, 3), np.uint8)  # red | green | blue thirds: the centre crop is all green
    wide[:, :20, 0] = wide[:, 20:40, 1] = wide[:, 40:, 2] = 255
    Image.fromarray(wide).save(root / "cats" / "wide photo (1).png")
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "dogs" / "grey.bmp")
    Image.fromarray(rng.integers(0, 256, (18, 18, 4), dtype=np.uint8)).save(
        root / "dogs" / "sub" / "alpha.webp"
    )
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("P").save(
        root / "dogs" / "sub" / "p.gif"
    )
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        root / "dogs" / "c.JPEG", quality=90
    )
    (root / "dogs" / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / ".hidden" / "x.png")


# --------------------------------------------------------------------------------------------- sources


def test_tiny_shards_fixture(tiny_shards: str) -> None:
    samples = check_set(Path(tiny_shards), (16, 16, 3))
    m = json.loads((Path(tiny_shards) / "manifest.json").read_text())
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 300
    assert 30 < m["splits"]["val"]["count"] < 90 and len(m["splits"]["train"]["shards"]) >= 5
    assert m["labels"]["names"] == ["square", "ellipse", "triangle", "heart"]
    assert m["args"]["val_fraction"] == 0.2 and m["skipped"] == []
    for smp in samples["train"][:20]:
        assert smp["cls"] == smp["json"]["shape"]
        assert smp["npy"].std() > 0  # a shape on a background, not a blank image


def test_synthetic_is_independent_of_worker_count(tmp_path: Path) -> None:
    args = ("--source", "synthetic:150", "--size", "12", "--shard-size", "20")
    m1 = shard(tmp_path / "w1", *args, workers=1)
    m2 = shard(tmp_path / "w2", *args, workers=2)
    assert file_hashes(tmp_path / "w1") == file_hashes(tmp_path / "w2")
    assert m1 == m2 and len(m1["splits"]["train"]["shards"]) == -(-m1["splits"]["train"]["count"] // 20) > 2


def test_imagefolder(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "pets")
    m = shard(
        tmp_path / "out",
        "--source",
        f"imagefolder:{tmp_path / 'pets'}",
        "--size",
        "16",
        "--train-only",
    )
    assert m["labels"] == {"num_classes": 2, "names": ["cats", "dogs"]}
    assert m["factors"] is None and m["args"]["size"] == 16 and m["args"]["channels"] == 3
    assert [s["path"] for s in m["skipped"]] == [str(tmp_path / "pets" / "cats" / "broken.jpg")]
    assert m["splits"]["train"]["count"] == 6 and m["splits"]["val"]["count"] == 0
    samples = check_set(tmp_path / "out", (16, 16, 3))["train"]
    by_key = {s["__key__"]: s for s in samples}
    assert sorted(k.rsplit("-", 1)[0] for k in by_key) == [
        "cats_a_png",
        "cats_wide_photo__1__png",
        "dogs_c_JPEG",
        "dogs_grey_bmp",
        "dogs_sub_alpha_webp",
        "dogs_sub_p_gif",
    ]
    for key, smp in by_key.items():
        assert smp["cls"] == (0 if key.startswith("cats") else 1)
    wide = next(s["npy"] for k, s in by_key.items() if k.startswith("cats_wide"))
    assert wide[8, 8].tolist() == [0, 255, 0] and wide[:, 4:12, 1].min() > 200  # centre crop, not squashed


def test_imagefolder_loose_files_without_classes(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    for k in range(5):
        Image.new("L", (10 + k, 10), color=40 * k).save(tmp_path / "flat" / f"img{k}.png")
    m = shard(
        tmp_path / "out",
        *("--source", f"imagefolder:{tmp_path / 'flat'}", "--size", "8", "--channels", "1", "--train-only"),
    )
    assert m["labels"] is None and m["skipped"] == []
    samples = check_set(tmp_path / "out", (8, 8, 1))
    assert all("cls" not in s for split in samples.values() for s in split)


def test_idx_official_split_and_resize(tmp_path: Path) -> None:
    arrays = make_idx_dir(tmp_path / "idx")
    m = shard(tmp_path / "out", "--source", f"mnist:{tmp_path / 'idx'}", "--shard-size", "5")
    assert (m["splits"]["train"]["count"], m["splits"]["val"]["count"]) == (12, 5)
    assert m["labels"]["names"] == [str(d) for d in range(10)] and m["args"]["val_fraction"] is None
    samples = check_set(tmp_path / "out", (8, 8, 1))
    images = {"train": arrays["train-images-idx3-ubyte.gz"], "test": arrays["t10k-images-idx3-ubyte"]}
    labels = {"train": arrays["train-labels-idx1-ubyte"], "test": arrays["t10k-labels-idx1-ubyte.gz"]}
    for split, prefix in (("train", "train"), ("val", "test")):
        for smp in samples[split]:
            pre, idx = smp["__key__"].split("-")
            assert pre == prefix
            np.testing.assert_array_equal(smp["npy"][..., 0], images[prefix][int(idx)])
            assert smp["cls"] == labels[prefix][int(idx)]
    # With --val-fraction the official split is ignored: membership by key hash over train + test.
    shard(tmp_path / "hashed", "--source", f"mnist:{tmp_path / 'idx'}", "--val-fraction", "0.5")
    keys = [f"train-{i:05d}" for i in range(12)] + [f"test-{i:05d}" for i in range(5)]
    val = [s["__key__"] for s in read_back(tmp_path / "hashed", "val")]
    assert sorted(val) == sorted(k for k in keys if in_val(k, 0.5)) and 0 < len(val) < 17
    m = shard(
        tmp_path / "rgb", "--source", f"fashion-mnist:{tmp_path / 'idx'}", "--size", "16", "--channels", "3"
    )
    assert m["labels"]["names"] == FASHION_MNIST_NAMES
    check_set(tmp_path / "rgb", (16, 16, 3))


def test_cifar10(tmp_path: Path) -> None:
    train, test = make_cifar_dir(tmp_path / "data" / "cifar-10-batches-py")
    m = shard(tmp_path / "out", "--source", f"cifar10:{tmp_path / 'data'}")
    assert (m["splits"]["train"]["count"], m["splits"]["val"]["count"]) == (10, 3)
    assert m["labels"]["names"][0] == "airplane"
    samples = check_set(tmp_path / "out", (32, 32, 3))
    smp = next(s for s in samples["val"] if s["__key__"] == "test-00001")
    np.testing.assert_array_equal(smp["npy"], test[1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert len({s["__key__"] for s in samples["train"]}) == len(train)


def test_fashion_mnist_real(fmnist_shards: str) -> None:
    m = json.loads((Path(fmnist_shards) / "manifest.json").read_text())
    assert (m["splits"]["train"]["count"], m["splits"]["val"]["count"]) == (514, 86)
    assert m["labels"]["names"] == FASHION_MNIST_NAMES and len(m["splits"]["train"]["shards"]) == 6
    samples = check_set(Path(fmnist_shards), (28, 28, 1))
    assert all(s["__key__"].startswith("test-") for s in samples["val"])
    assert len({s["cls"] for s in samples["train"]}) == 10  # the seeded order mixes the classes
    assert 60 < np.mean([s["npy"].mean() for s in samples["train"]]) < 90  # real clothes, not noise


# --------------------------------------------------------------------------------------------- splits, formats


def test_membership_is_stable_across_seeds(tmp_path: Path) -> None:
    args = ("--source", "synthetic:200", "--size", "8", "--shard-size", "50", "--val-fraction", "0.25")
    shard(tmp_path / "s0", *args, "--seed", "0")
    shard(tmp_path / "s1", *args, "--seed", "1")
    keys = {
        s: {split: [x["__key__"] for x in read_back(tmp_path / s, split)] for split in ("train", "val")}
        for s in ("s0", "s1")
    }
    for split in ("train", "val"):
        assert sorted(keys["s0"][split]) == sorted(keys["s1"][split])
        assert keys["s0"][split] != keys["s1"][split]  # same members, another order
    assert all(in_val(k, 0.25) for k in keys["s0"]["val"]) and 30 < len(keys["s0"]["val"]) < 70


def test_png_and_jpg_encodings(tmp_path: Path) -> None:
    base = ("--source", "synthetic:20", "--size", "16", "--train-only")
    shard(tmp_path / "npy", *base)
    shard(tmp_path / "png", *base, "--format", "png")
    shard(tmp_path / "jpg", *base, "--format", "jpg", "--jpeg-quality", "90")
    png = list(wds.WebDataset(str(tmp_path / "png" / "train-000000.tar"), shardshuffle=False).decode("rgb8"))
    jpg = list(wds.WebDataset(str(tmp_path / "jpg" / "train-000000.tar"), shardshuffle=False).decode("rgb8"))
    for a, p, j in zip(read_back(tmp_path / "npy", "train"), png, jpg, strict=True):
        assert a["__key__"] == p["__key__"] == j["__key__"]
        np.testing.assert_array_equal(a["npy"], p["png"])
        assert np.abs(a["npy"].astype(int) - j["jpg"].astype(int)).mean() < 12


def test_overwrite_replaces_the_old_set(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard(out, "--source", "synthetic:60", "--size", "8", "--shard-size", "10")
    (out / "train-000001.tar.tmp").write_bytes(b"left by a crash")
    m = shard(out, "--source", "synthetic:60", "--size", "8", "--shard-size", "100", "--overwrite")
    names = [s["name"] for split in m["splits"].values() for s in split["shards"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["manifest.json"])


# --------------------------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("precious")
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "manifest.json").write_text("{}")
    (tmp_path / "set" / "keep.txt").write_text("precious")
    (tmp_path / "badidx").mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (tmp_path / "badidx" / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12 + b"junk")
    (tmp_path / "magic").mkdir()
    write_idx(tmp_path / "magic" / "train-images-idx3-ubyte", np.zeros(4, np.uint8))  # a label file
    write_idx(tmp_path / "magic" / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    return [
        (["--source", "pixels:3"], "unknown source"),
        (["--source", f"fashion-mnist:{tmp_path / 'magic'}"], "not an IDX3 ubyte file"),
        (["--source", f"imagefolder:{tmp_path / 'nope'}"], "not a directory"),
        (["--source", f"imagefolder:{tmp_path / 'empty'}"], "no images"),
        (["--source", f"mnist:{tmp_path / 'empty'}"], "missing train-images-idx3-ubyte"),
        (["--source", f"mnist:{tmp_path / 'badidx'}"], "header says shape"),
        (["--source", f"cifar10:{tmp_path / 'empty'}"], "data_batch_1"),
        (["--source", "synthetic:zero"], "positive integer"),
        (["--source", "synthetic:10", "--val-fraction", "1"], "--val-fraction"),
        (["--source", "synthetic:10", "--val-fraction", "-0.1"], "--val-fraction"),
        (["--source", "synthetic:10", "--channels", "2"], "--channels"),
        (["--source", "synthetic:10", "--shard-size", "0"], "--shard-size"),
        (["--source", "synthetic:10", "--download"], "--download"),
        (["--source", "synthetic:10", "--task-index", "2", "--num-tasks", "2"], "--task-index"),
        (["--out", str(tmp_path / "full"), "--source", "synthetic:10"], "not empty"),
        (["--out", str(tmp_path / "full"), "--source", "synthetic:10", "--overwrite"], "mine.txt"),
        (["--out", str(tmp_path / "set"), "--source", "synthetic:10", "--overwrite"], "keep.txt"),
        (["--finalize", "--out", str(tmp_path / "empty")], "part-0.json"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for argv, needle in _bad_inputs(tmp_path):
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "new")]
        assert_refused(argv, tmp_path, capsys, needle)


def file_hashes_tree(root: Path) -> dict[str, str]:
    """Every file (its sha256) and directory (``"/"``) under ``root``: a created empty dir counts too."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in root.rglob("*")
    }


def assert_refused(
    argv: list[str], root: Path, capsys: pytest.CaptureFixture, *needles: str, scanned: bool = False
) -> str:
    """``vaejob.shard ARGV`` exits 2 with ONE error line holding every needle, and nothing under ``root``
    changes (no file, no directory); returns the line. ``scanned``: after ``--index``'s progress bar."""
    before = file_hashes_tree(root)
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    if scanned:  # the bar's lines are tqdm's carriage-return redraws
        bar, err = err.rsplit("\n", 2)[0], err.rsplit("\n", 2)[1] + "\n"
        assert all(line.startswith("\rvaejob.shard --index:") for line in bar.split("\n")), bar
    assert err.count("\n") == 1 and err.startswith("vaejob.shard: error: "), (argv, err)
    assert all(n in err for n in needles), (argv, err)
    assert file_hashes_tree(root) == before, argv
    return err


@pytest.mark.parametrize(
    "case",
    ["val-fraction", "official-split-without-train", "limit-keeps-no-train"],
)
def test_empty_train_split_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    if case == "val-fraction":  # every key hashes below 0.999999: all 50 images would go to val
        argv, fix = ["--source", "synthetic:50", "--val-fraction", "0.999999"], "lower --val-fraction"
    elif case == "official-split-without-train":
        make_idx_dir(tmp_path / "idx", n_train=0, n_test=5)
        argv, fix = ["--source", f"mnist:{tmp_path / 'idx'}"], "pass --val-fraction"
    else:  # 1 of 31 images is official train: --limit 1 keeps round(1 * 1/31) = 0 of it
        make_idx_dir(tmp_path / "idx", n_train=1, n_test=30)
        argv, fix = ["--source", f"mnist:{tmp_path / 'idx'}", "--limit", "1"], "raise --limit"
    argv += ["--out", str(tmp_path / "new"), "--workers", "1"]
    assert_refused(argv, tmp_path, capsys, "the train split would be empty", fix)


@pytest.mark.parametrize(
    "case", ["zero", "zero-overwrite", "zero-task", "default-hashes-none", "limit-keeps-no-test", "no-test"]
)
def test_empty_val_split_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    """vaejob.train and vaejob.evaluate need val images: a set without any is refused before anything is
    written or removed (``--train-only`` asks for one on purpose)."""
    out = tmp_path / "new"
    argv = ["--source", "synthetic:300", "--val-fraction", "0"]
    needles = ["the val split would be empty: --val-fraction 0 puts none of the 300 images", "--train-only"]
    if case == "zero-overwrite":  # the old set stays whole: nothing is cleared before the refusal
        write_shard_set("--source", "synthetic:30", "--size", "8", out=out)
        argv.append("--overwrite")
    elif case == "zero-task":
        argv += ["--task-index", "0", "--num-tasks", "2"]
    elif case == "default-hashes-none":  # no key of synthetic:10 hashes below the default 0.1
        argv = ["--source", "synthetic:10"]
        needles = ["--val-fraction 0.1 (the default) puts none of the 10 images", "raise --val-fraction"]
    elif case == "limit-keeps-no-test":  # 1 of 31 images is official test: --limit 1 keeps the train one
        make_idx_dir(tmp_path / "idx", n_train=30, n_test=1)
        argv = ["--source", f"mnist:{tmp_path / 'idx'}", "--limit", "1"]
        needles = ["--limit 1 keeps none of the official test images", "raise --limit"]
    elif case == "no-test":
        make_idx_dir(tmp_path / "idx", n_train=5, n_test=0)
        argv = ["--source", f"mnist:{tmp_path / 'idx'}"]
        needles = ["has no official test images", "pass --val-fraction F to split its 5 images by key hash"]
    argv += ["--size", "8", "--out", str(out), "--workers", "1"]
    assert_refused(argv, tmp_path, capsys, "the val split would be empty", *needles)


@pytest.mark.parametrize("case", ["zero", "hashes-none", "no-tar-named"])
def test_index_refuses_an_empty_val_split_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    tars = tmp_path / "tars"
    keys = write_foreign_shards(tars, n=6, per_shard=3, bad=False)["good"]
    flags, needles = {
        "zero": (["--val-fraction", "0"], ["--val-fraction 0 leaves the val split empty", "--train-only"]),
        "hashes-none": (["--val-fraction", "0.001"], ["--val-fraction 0.001 puts none of the 6", "raise"]),
        "no-tar-named": (
            ["--val-shards", "val-*.tar"],
            ["--val-shards 'val-*.tar' names no tar", "data-00001"],
        ),
    }[case]
    assert not any(in_val(k, 0.001) for k in keys)
    argv = ["--index", str(tars), *flags, "--workers", "1"]
    assert_refused(argv, tmp_path, capsys, f"--index {tars}", *needles, scanned=case != "zero")


def test_train_only_writes_a_set_without_val(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What loader benchmarks read: every image in train, on purpose (vaejob.train refuses the set)."""
    m = shard(tmp_path / "set", "--source", "synthetic:30", "--size", "8", "--train-only")
    assert (m["splits"]["train"]["count"], m["splits"]["val"]) == (30, {"count": 0, "shards": []})
    tars = tmp_path / "tars"
    write_foreign_shards(tars, n=6, per_shard=3, bad=False)
    assert main(["--index", str(tars), "--train-only", "--workers", "1"]) == 0
    assert (manifest(tars)["splits"]["train"]["count"], manifest(tars)["splits"]["val"]["count"]) == (6, 0)
    capsys.readouterr()
    for argv in (
        ["--source", "synthetic:30", "--train-only", "--val-fraction", "0.2", "--out", str(tmp_path / "x")],
        ["--index", str(tars), "--train-only", "--val-shards", "data-00001.tar", "--overwrite"],
    ):
        assert_refused(argv, tmp_path, capsys, "--train-only", "pass one")


@pytest.mark.parametrize(
    "case", ["file/sub", "file/sub/deeper", "file/", "dangling-link/sub", "dangling-link"]
)
def test_out_that_cannot_be_created_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    (tmp_path / "file").write_text("precious")
    (tmp_path / "dangling-link").symlink_to(tmp_path / "nowhere")
    out, top = f"{tmp_path}/{case}", case.split("/")[0]  # an f-string keeps a trailing "/"
    blocker = out if case.rstrip("/") == top else str(tmp_path / top)  # the path named as in the way
    argv = ["--source", "synthetic:10", "--out", out, "--workers", "1"]
    assert_refused(argv, tmp_path, capsys, f"{blocker!r} is not a directory", "choose another --out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory anyway")
def test_out_in_a_read_only_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        argv = ["--source", "synthetic:10", "--out", str(locked / "a" / "b"), "--workers", "1"]
        assert_refused(argv, tmp_path, capsys, "no permission to create", repr(str(locked)))
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("size", ["8193", "100000"])
def test_size_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture, size: str) -> None:
    argv = ["--source", "synthetic:1", "--size", size, "--out", str(tmp_path / "new")]
    assert_refused(argv, tmp_path, capsys, "--size", "8192", repr(size))


def test_workers_that_do_not_fit_in_memory_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker needs ~10 bytes per output byte (0.5 GB at 4096x4096x3): 1.2 GB free fits 2 of them.
    monkeypatch.setattr("vaejob.shard.available_memory", lambda: 1_200_000_000)
    argv = [
        "--source",
        "synthetic:4",
        "--size",
        "4096",
        "--shard-size",
        "1",
        "--workers",
        "4",
        "--train-only",
    ]
    argv += ["--out", str(tmp_path / "new")]
    assert_refused(argv, tmp_path, capsys, "--workers 4", "--size 4096", "pass --workers 2")


# --------------------------------------------------------------------------------------------- unreadable images


def make_broken_folder(root: Path, n: int, good: Callable[[str], bool] = lambda key: False) -> None:
    """``n`` PNG files ``img00.png ...``: a real image where ``good(key)``, else a corrupt one."""
    root.mkdir(parents=True)
    for k in range(n):
        path = root / f"img{k:02d}.png"
        if good(sanitize_key(path.name)):
            Image.new("RGB", (8, 8), color=(10 * k, 0, 0)).save(path)
        else:
            path.write_bytes(b"\x89PNG\r\n\x1a\n corrupt")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_source_whose_every_image_is_unreadable_fails_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, workers: int
) -> None:
    make_broken_folder(tmp_path / "bad", 6)
    spec = f"imagefolder:{tmp_path / 'bad'}"
    argv = ["--source", spec, "--shard-size", "2", "--out", str(tmp_path / "new" / "set")]
    err = assert_refused([*argv, "--workers", str(workers)], tmp_path, capsys)
    assert f"all 6 images of {spec!r} were unreadable (first: " in err, err
    assert re.search(r"\(first: '[^']+/bad/img\d\d\.png': \w+: [^;]+\); fix or remove them", err), err


@pytest.mark.parametrize("out", ["new/set", "existing-empty"])
def test_unreadable_train_images_remove_the_written_val_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture, out: str
) -> None:
    """Train ends up empty after val shards were written: they are removed, with the dirs this run made."""
    make_broken_folder(tmp_path / "half", 12, good=lambda key: in_val(key, 0.5))
    (tmp_path / "existing-empty").mkdir()
    spec = f"imagefolder:{tmp_path / 'half'}"
    n_train = sum(not in_val(sanitize_key(f"img{k:02d}.png"), 0.5) for k in range(12))
    assert 0 < n_train < 12  # both splits planned: the val shards do get written
    argv = ["--source", spec, "--val-fraction", "0.5", "--shard-size", "2", "--out", str(tmp_path / out)]
    err = assert_refused([*argv, "--workers", "2"], tmp_path, capsys)
    assert f"all {n_train} train images of {spec!r} were unreadable" in err, err
    assert "the train split would be empty" in err and "fix or remove them" in err, err


def test_finalize_refuses_a_set_without_train_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_broken_folder(tmp_path / "bad", 4)
    out = tmp_path / "array"
    args = ["--source", f"imagefolder:{tmp_path / 'bad'}", "--shard-size", "1", "--out", str(out)]
    for i in range(2):
        assert main([*args, "--task-index", str(i), "--num-tasks", "2"]) == 0
    capsys.readouterr()
    err = assert_refused(["--finalize", "--out", str(out)], tmp_path, capsys, "were unreadable")
    assert not (out / "manifest.json").exists() and "re-run every task" in err, err


def test_cli_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-m", "vaejob.shard", "--source", "synthetic:30", "--size", "8", "--workers", "2"]
    cp = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.count("\n") == 1 and "-> shards/synthetic" in cp.stdout  # default --out
    assert (tmp_path / "shards" / "synthetic" / "manifest.json").is_file()
    cp = subprocess.run(run[:5], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1 and "--overwrite" in cp.stderr


# --------------------------------------------------------------------------------------------- job arrays


def test_task_array_and_finalize_match_a_single_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_imagefolder(tmp_path / "pets")
    for src in ("synthetic:130", f"imagefolder:{tmp_path / 'pets'}"):
        args = (
            "--source",
            src,
            "--size",
            "8",
            "--shard-size",
            "3" if "pets" in src else "20",
            "--val-fraction",
            "0.3",
        )
        single, array = tmp_path / "single", tmp_path / "array"
        shard(single, *args, "--overwrite")
        for i in (2, 0):  # tasks in any order; the finalize check below catches the missing one
            assert (
                main([*args, "--out", str(array), "--task-index", str(i), "--num-tasks", "3", "--overwrite"])
                == 0
            )
        assert not (array / "manifest.json").exists()
        assert main(["--finalize", "--out", str(array)]) == 2 and "part-1.json" in capsys.readouterr().err
        assert (
            main([*args, "--out", str(array), "--task-index", "1", "--num-tasks", "3", "--workers", "2"]) == 0
        )
        assert main(["--finalize", "--out", str(array)]) == 0
        assert file_hashes(single) == file_hashes(array) and not (array / "parts").exists()
        for d in (single, array):
            for p in d.iterdir():
                p.unlink()
