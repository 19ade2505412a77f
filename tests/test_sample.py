"""vaejob.sample on a real tiny run, in real processes: byte-identical across rank counts, resumable."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.util import module_cmd, run
from vaejob.loader import make_loader
from vaejob.shards import open_shards

pytestmark = pytest.mark.slow


SAMPLE_ARGS = [
    "--num",
    "50",
    "--shard-size",
    "20",
    "--batch-size",
    "8",
    "--seed",
    "3",
    "--temperature",
    "0.8",
]
SHARDS = [f"samples-{i:06d}.tar" for i in range(3)]


def sample(run_dir: Path, out: Path | str, nproc: int = 1):
    cp = run(module_cmd("vaejob.sample", nproc) + ["--run", str(run_dir), "--out", str(out), *SAMPLE_ARGS])
    assert cp.returncode == 0, cp.stderr[-3000:]
    return cp


@pytest.fixture(scope="module")
def sampled(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample set of one process, the reference the other runs must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("sampled") / "one"
    sample(tiny_run, out, 1)
    return out


def test_sample_deterministic_across_ranks_manifest_and_resume(
    tiny_run: Path, sampled: Path, tmp_path: Path
) -> None:
    one, two = sampled, tmp_path / "two"
    sample(tiny_run, two, 2)
    for name in [*SHARDS, "manifest.json", "samples.png"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name

    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["format"] == "vaejob-shards/1" and manifest["encoding"] == "npy"
    assert (manifest["count"], manifest["seed"], manifest["temperature"], manifest["step"]) == (
        50,
        3,
        0.8,
        60,
    )
    assert manifest["image"] == {"channels": 3, "height": 16, "width": 16}
    entries = manifest["splits"]["samples"]["shards"]
    assert [e["name"] for e in entries] == SHARDS and [e["count"] for e in entries] == [20, 20, 10]
    for e in entries:
        assert hashlib.sha256((one / e["name"]).read_bytes()).hexdigest() == e["sha256"]
    # the set feeds another job: the training loader reads it back, every sample once, in order
    shards = open_shards(str(one), verify=True)
    batches = list(make_loader(shards, "samples", 16, rank=0, world_size=1, num_workers=0, with_keys=True))
    keys = [k for b in batches for k in b["key"] if k]
    assert keys == [f"sample-{i:09d}" for i in range(50)]
    images = torch.cat([b["image"][b["valid"]] for b in batches])
    assert images.shape == (50, 3, 16, 16) and images.std() > 0

    # resume: a lost shard is regenerated alone, byte-identical; the others are not rewritten
    (two / SHARDS[1]).unlink()
    inodes = {n: (two / n).stat().st_ino for n in (SHARDS[0], SHARDS[2])}
    cp = sample(tiny_run, two, 1)
    assert "generated 1 of its 3 shard(s) (2 already complete)" in cp.stderr
    assert {n: (two / n).stat().st_ino for n in inodes} == inodes
    for name in [*SHARDS, "manifest.json"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


MEMORY_SCRIPT = """
import hashlib, json, sys, fsspec
from vaejob.shards import open_shards
from vaejob.sample import main
run_dir, out, args = sys.argv[1], "memory://vaejob-test/samples", sys.argv[2:]
assert main(["--run", run_dir, "--out", out, *args]) == 0
fs = fsspec.filesystem("memory")
fs.rm("/vaejob-test/samples/samples-000002.tar")
assert main(["--run", run_dir, "--out", out, *args]) == 0
shards = open_shards(out, verify=True)
names = [f"samples-{i:06d}.tar" for i in range(3)]
digest = {n: hashlib.sha256(fs.cat(f"/vaejob-test/samples/{n}")).hexdigest() for n in names}
print(json.dumps({"count": shards.split("samples").count, "digest": digest}))
"""


def test_sample_to_memory_url(tiny_run: Path, sampled: Path, tmp_path: Path) -> None:
    script = tmp_path / "memory_sample.py"
    script.write_text(MEMORY_SCRIPT)
    cp = run([sys.executable, str(script), str(tiny_run), *SAMPLE_ARGS])
    assert cp.returncode == 0, cp.stderr[-3000:]
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    assert out["count"] == 50
    assert "generated 1 of its 3 shard(s) (2 already complete)" in cp.stderr
    for name in SHARDS:
        assert out["digest"][name] == hashlib.sha256((sampled / name).read_bytes()).hexdigest()
