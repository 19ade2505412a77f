"""Hugging Face datasets as a source: ``vaejob.shard --source hf:PATH`` on local ``save_to_disk`` directories
and parquet files made here with ``datasets.Dataset.from_dict`` (no network), then training on the result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.foreign import encode, picture
from tests.util import launch_cmd, manifest, metrics, run, tiny_overrides
from vaejob.shard import main as shard_main
from vaejob.shards import open_shards

datasets = pytest.importorskip("datasets", reason="the hf extra: pip install 'vaejob[hf]'")

NAMES = ["circle", "square", "stripe"]


def make_dataset(n: int = 40, seed: int = 0, broken: int | None = 5):
    """Rows of JPEG / PNG images of mixed sizes and modes with a ClassLabel; row ``broken`` holds bytes
    that are not an image."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        mode, ext = [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("RGB", "png")][i % 4]
        data = encode(picture(rng, w, h), mode, ext)
        if i == broken:
            data = b"not an image at all"
        images.append({"bytes": data, "path": None})
        labels.append(i % 3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    ds = make_dataset()
    ds.save_to_disk(str(root / "disk"))
    ds.to_parquet(str(root / "data.parquet"))
    dd = datasets.DatasetDict(
        {"train": make_dataset(30, seed=1, broken=None), "test": make_dataset(10, seed=2, broken=None)}
    )
    dd.save_to_disk(str(root / "dict"))
    plain = datasets.Dataset.from_dict({"text": ["a", "b"], "score": [1, 2]})
    plain.save_to_disk(str(root / "no-images"))
    return {
        "disk": root / "disk",
        "parquet": root / "data.parquet",
        "dict": root / "dict",
        "no-images": root / "no-images",
        "root": root,
    }


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_save_to_disk_and_parquet_shard_alike(hf_dirs, tmp_path, kind) -> None:
    out = tmp_path / kind
    assert (
        shard_main(
            ["--source", f"hf:{hf_dirs[kind]}", "--size", "16", "--val-fraction", "0.25", "--out", str(out)]
        )
        == 0
    )
    m = manifest(out)
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 39  # row 5 is not an image
    assert len(m["skipped"]) == 1 and "row train-00000005" in m["skipped"][0]["path"]
    assert m["labels"]["names"] == NAMES and m["image"] == {"height": 16, "width": 16, "channels": 3}
    shards = open_shards(str(out))
    assert shards.image_shape == (3, 16, 16)
    if kind == "parquet":  # the same rows give the same shards, whichever way they were saved
        other = tmp_path / "again"
        assert (
            shard_main(
                [
                    "--source",
                    f"hf:{hf_dirs['disk']}",
                    "--size",
                    "16",
                    "--val-fraction",
                    "0.25",
                    "--out",
                    str(other),
                ]
            )
            == 0
        )
        assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {
            p.name: p.read_bytes() for p in other.glob("*.tar")
        }


def test_a_dataset_dict_keeps_its_official_split_and_split_selects(hf_dirs, tmp_path) -> None:
    out = tmp_path / "dict"
    assert shard_main(["--source", f"hf:{hf_dirs['dict']}", "--size", "8", "--out", str(out)]) == 0
    m = manifest(out)
    assert (m["splits"]["train"]["count"], m["splits"]["val"]["count"]) == (30, 10)
    only = tmp_path / "test-only"
    assert (
        shard_main(
            [
                "--source",
                f"hf:{hf_dirs['dict']}:test",
                "--size",
                "8",
                "--val-fraction",
                "0.2",
                "--out",
                str(only),
            ]
        )
        == 0
    )
    assert manifest(only)["splits"]["train"]["count"] + manifest(only)["splits"]["val"]["count"] == 10


def test_bad_hf_input_is_one_line(hf_dirs, tmp_path, capsys) -> None:
    cases = [
        (f"hf:{hf_dirs['no-images']}", ["has no image column", "columns: text, score", "--image-column"]),
        (f"hf:{hf_dirs['dict']}:nosuch", ["no split 'nosuch'", "train, test"]),
        (f"hf:{hf_dirs['root']}/missing-dir", ["not found"]),
    ]
    for spec, parts in cases:
        capsys.readouterr()
        assert shard_main(["--source", spec, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        for part in parts:
            assert part in err, err
    capsys.readouterr()
    assert (
        shard_main(
            ["--source", f"hf:{hf_dirs['disk']}", "--image-column", "pixels", "--out", str(tmp_path / "y")]
        )
        == 2
    )
    assert "no column 'pixels' (columns: image, label)" in capsys.readouterr().err


@pytest.mark.slow
def test_training_on_a_hugging_face_dataset(hf_dirs, tmp_path) -> None:
    out = tmp_path / "shards"
    assert (
        shard_main(
            ["--source", f"hf:{hf_dirs['disk']}", "--size", "16", "--val-fraction", "0.25", "--out", str(out)]
        )
        == 0
    )
    run_dir = tmp_path / "run"
    cp = run(launch_cmd(1) + tiny_overrides(str(out), run_dir, **{"train.batch_size": 4}), timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert metrics(run_dir, "val")[-1]["count"] == manifest(out)["splits"]["val"]["count"]
