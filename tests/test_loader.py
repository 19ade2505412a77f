"""`vaejob.loader` on real shard sets: values, DDP splitting in 2 real processes, exact resume, workers."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch

from tests.util import (
    REPO,
    cpu_env,
    flat,
    keys_of,
    loader,
    manifest,
    one_line_error,
    reference,
    shard_keys,
    urls,
)
from vaejob.loader import make_loader
from vaejob.loader.workers import Slots
from vaejob.shards import DataError, open_shards


@pytest.fixture(scope="module")
def few_shards(make_shards) -> str:
    """Fewer shards than 2 ranks x 2 workers: about 80 train images in 2 shards, 20 val in 1."""
    return make_shards(
        "--source", "synthetic:100", "--size", "8", "--shard-size", "50", "--val-fraction", "0.2"
    )


@pytest.fixture(scope="module")
def png_shards(make_shards) -> str:
    return make_shards("--source", "synthetic:60", "--size", "12", "--shard-size", "16", "--format", "png")


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("fixture", ["tiny_shards", "png_shards", "fmnist_shards"])
def test_values_match_webdataset(fixture: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(fixture)
    ref = reference(root)
    m = manifest(root)
    shape = (m["image"]["channels"], m["image"]["height"], m["image"]["width"])
    for split, workers in (("train", 2), ("val", 0)):
        seen = []
        for raw in (True, False):
            it = loader(root, split, num_workers=workers, raw=raw)
            assert it.image_shape == shape and it.num_classes == m["labels"]["num_classes"]
            for batch in it:
                images, labels, valid = batch["image"], batch["label"], batch["valid"]
                assert images.shape == (8, *shape) and images.is_contiguous()
                assert images.dtype == (torch.uint8 if raw else torch.float32)
                assert labels.dtype == torch.int64 and valid.dtype == torch.bool
                if not raw:
                    assert 0.0 <= images.min() and images.max() <= 1.0
                for key, image, label, ok in zip(batch["key"], images, labels, valid, strict=True):
                    if not ok:  # val padding
                        assert key == "" and label == -1 and not image.any()
                        continue
                    expected = torch.from_numpy(ref[key][0].copy()).permute(2, 0, 1)
                    if not raw:
                        expected = expected.float() / 255
                    assert torch.equal(image, expected), key
                    assert label == ref[key][1]
                    seen.append(key)
        assert len(seen) == len(set(seen)) * 2  # each key once per pass
        expected_count = m["splits"][split]["count"]
        assert len(set(seen)) == (expected_count if split == "val" else expected_count // 8 * 8)


def test_shard_order_per_epoch(tiny_shards: str) -> None:
    owner = shard_keys(tiny_shards, "train")

    def order(epoch: int, seed: int = 5) -> list[str]:
        unshuffled = loader(tiny_shards, seed=seed, epoch=epoch, num_workers=0, shuffle_buffer=1)
        names = [owner[k] for k in flat(keys_of(unshuffled))]
        return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]

    orders = [order(e) for e in range(4)]
    assert all(sorted(o) == sorted(set(owner.values())) for o in orders)  # each shard read once, in one run
    assert len({tuple(o) for o in orders}) > 1  # the permutation changes with the epoch...
    assert order(2) == orders[2]  # ...and is a function of (seed, epoch)
    assert order(2, seed=6) != orders[2] or order(3, seed=6) != orders[3]
    val = loader(tiny_shards, "val", num_workers=0)
    assert flat(keys_of(val)) == list(shard_keys(tiny_shards, "val"))  # val: manifest order, unshuffled


# ----------------------------------------------------------------------------------------- two processes

DDP_SCRIPT = """
import json, sys
import torch.distributed as dist
from vaejob.loader import make_loader

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2, world

def epoch(loader):
    out = []
    for b in loader:
        assert len(b["key"]) == 8 and b["image"].shape[0] == 8
        out.append([k for k, v in zip(b["key"], b["valid"].tolist()) if v])
    return out

result = {"world": world}
for name, root in zip(("few", "tiny"), sys.argv[2:]):
    train = make_loader(root, "train", 8, seed=3, num_workers=2, with_keys=True, raw=True)
    again = make_loader(root, "train", 8, seed=3, num_workers=2, with_keys=True, raw=True)
    val = make_loader(root, "val", 8, num_workers=2, with_keys=True)
    result[name] = {
        "len_train": len(train), "len_val": len(val),
        "train": [epoch(train), epoch(train)], "train_again": epoch(again), "val": epoch(val),
    }
dist.barrier()
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks(tmp_path: Path, few_shards: str, tiny_shards: str) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = cpu_env(PYTHONPATH=str(REPO))
    args = [*cmd, str(script), str(tmp_path), few_shards, tiny_shards]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    for name, root in (("few", few_shards), ("tiny", tiny_shards)):
        m = manifest(root)
        r0, r1 = ranks[0][name], ranks[1][name]
        n_train, n_val = m["splits"]["train"]["count"], m["splits"]["val"]["count"]
        quota = n_train // (2 * 8) * 8
        assert r0["len_train"] == r1["len_train"] == quota // 8
        assert r0["len_val"] == r1["len_val"] == math.ceil(math.ceil(n_val / 2) / 8)
        for e in range(2):
            a, b = flat(r0["train"][e]), flat(r1["train"][e])
            assert len(r0["train"][e]) == len(r1["train"][e]) == quota // 8  # equal batch counts
            assert len(a) == len(set(a)) == quota and len(b) == len(set(b)) == quota
            assert not set(a) & set(b)  # disjoint across ranks
            assert set(a) | set(b) <= set(shard_keys(root, "train"))
        for r in (r0, r1):
            assert r["train_again"] == r["train"][0]  # same (seed, epoch): same batches, same order
            assert r["train"][1] != r["train"][0]
        assert len(r0["val"]) == len(r1["val"]) == r0["len_val"]
        val = flat(r0["val"]) + flat(r1["val"])
        assert sorted(val) == sorted(shard_keys(root, "val"))  # every val sample exactly once
    assert len(manifest(few_shards)["splits"]["val"]["shards"]) == 1  # fewer shards than 2 ranks x 2 workers
    assert len(manifest(few_shards)["splits"]["train"]["shards"]) < 4


# ---------------------------------------------------------------------------------------------- resume


def test_resume_continues_the_epoch_exactly(tiny_shards: str) -> None:
    def rank1(seed: int = 1):
        return loader(
            tiny_shards, seed=seed, epoch=2, num_workers=2, raw=True, rank=1, world_size=2, shuffle_buffer=50
        )

    full = keys_of(rank1())
    for k in (1, 4, len(full) - 1):
        first = rank1()
        assert keys_of(first, limit=k) == full[:k]
        state = first.state_dict()
        assert state == {
            "epoch": 2,
            "batch": k,
            "skipped": 0,
            "world_size": 2,
            "batch_size": 8,
            "seed": 1,
            "num_workers": 2,
        }
        resumed = rank1(seed=99)  # the checkpoint's seed wins
        resumed.load_state_dict(state)
        assert keys_of(resumed) == full[k:]
        assert (resumed.epoch, resumed.batch) == (3, 0)
        assert keys_of(first) == full[k:]  # the same loader object also continues where it stopped
    done = rank1()
    done.load_state_dict({**done.state_dict(), "batch": len(full)})  # checkpoint after the last batch
    assert keys_of(done) == [] and done.epoch == 3

    single = keys_of(loader(tiny_shards, num_workers=0))  # the single-process path resumes alike
    first = loader(tiny_shards, num_workers=0)
    assert keys_of(first, limit=3) == single[:3]
    resumed = loader(tiny_shards, num_workers=0)
    resumed.load_state_dict(first.state_dict())
    assert keys_of(resumed) == single[3:]


def test_workers_persist_across_epochs(tiny_shards: str) -> None:
    import multiprocessing

    def fresh(epoch: int, seed: int = 0) -> list[list[str]]:
        with loader(tiny_shards, epoch=epoch, seed=seed, num_workers=2, raw=True, shuffle_buffer=50) as one:
            return keys_of(one)

    before = {p.pid for p in multiprocessing.active_children()}
    with loader(tiny_shards, num_workers=2, raw=True, shuffle_buffer=50) as kept:
        first = keys_of(kept)
        workers = {p.pid for p in multiprocessing.active_children()} - before
        assert len(workers) == 2  # started by the first epoch, alive after it
        assert first == fresh(0)
        assert keys_of(kept, limit=2) == fresh(1)[:2]  # stopped mid-epoch 1 ...
        kept.set_epoch(2)  # ... then moved on: the same workers serve the new position
        assert keys_of(kept) == fresh(2) != first
        kept.load_state_dict({**kept.state_dict(), "seed": 7, "batch": 3})  # epoch 3 of another seed
        assert keys_of(kept) == fresh(3, seed=7)[3:]
        assert workers <= {p.pid for p in multiprocessing.active_children()}
    assert not workers & {p.pid for p in multiprocessing.active_children()}  # close() stopped them


_SIGTERM_STORM = """
import os, signal, subprocess, sys
from vaejob.loader import make_loader
received = []
signal.signal(signal.SIGTERM, lambda *_: received.append(1))
os.setpgrp()  # a process group of our own, as a Slurm job step has: the storm hits it, not pytest
storm = subprocess.Popen([sys.executable, "-c", "import os, signal, sys, time\\nwhile True:\\n"
                          "    os.killpg(int(sys.argv[1]), signal.SIGTERM); time.sleep(0.002)", str(os.getpgrp())])
try:
    for _ in range(20):  # fresh loaders: every one forks its workers under the storm
        with make_loader(sys.argv[1], "train", 8, num_workers=2, rank=0, world_size=1) as loader:
            counts = []
            for epoch in range(2):
                loader.set_epoch(epoch)
                counts.append(sum(len(b["image"]) for b in loader))
finally:
    storm.kill()
print(len(received) > 0, counts)
"""


def test_workers_survive_a_sigterm_storm(tiny_shards: str) -> None:
    """Slurm's SIGTERM reaches every process of the step, loader workers included, even one that is still
    starting: the workers must live on (only the trainer decides to stop) and every epoch must be whole."""
    cp = subprocess.run(
        [sys.executable, "-c", _SIGTERM_STORM, tiny_shards],
        env=cpu_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cp.returncode == 0, cp.stderr[-2000:]
    full = manifest(tiny_shards)["splits"]["train"]["count"] // 8 * 8
    assert cp.stdout.split("\n")[-2] == f"True [{full}, {full}]", cp.stdout


def test_resume_with_another_world_size(tiny_shards: str, caplog: pytest.LogCaptureFixture) -> None:
    old = loader(tiny_shards, num_workers=2, world_size=2)
    keys_of(old, limit=3)
    state = old.state_dict()
    for world, batch_size in ((1, 8), (1, 16), (3, 8)):
        new = loader(tiny_shards, batch_size=batch_size, num_workers=2, world_size=world)
        with caplog.at_level(logging.WARNING, logger="vaejob.loader.loader"):
            new.load_state_dict(state)
        assert "some samples may repeat or be skipped" in caplog.text
        caplog.clear()
        start = 3 * 2 * 8 // (world * batch_size)  # same fraction of the epoch consumed
        assert new.batch == start and new.epoch == 0
        assert len(keys_of(new)) == len(new) - start
        fresh = loader(tiny_shards, batch_size=batch_size, num_workers=2, epoch=1, world_size=world)
        assert keys_of(new) == keys_of(fresh)  # the next epoch is exact again


def test_brace_pattern(tiny_shards: str) -> None:
    n = len(manifest(tiny_shards)["splits"]["train"]["shards"])
    pattern = f"{tiny_shards}/train-{{000000..{n - 1:06d}}}.tar"
    shards = open_shards(pattern)
    assert shards.split("train").urls == tuple(urls(tiny_shards, "train"))
    assert len(loader(pattern)) == manifest(tiny_shards)["splits"]["train"]["count"] // 8
    with pytest.raises(DataError) as e:
        open_shards(f"{tiny_shards}/train-{{000000..{n - 2:06d}}}.tar")
    one_line_error(e, "not exactly one split")


def test_fsspec_url(few_shards: str) -> None:
    fs = fsspec.filesystem("memory")
    for path in Path(few_shards).iterdir():
        fs.pipe(f"/vaejob-test-data/few/{path.name}", path.read_bytes())
    url = "memory://vaejob-test-data/few"
    try:
        assert open_shards(url, verify=True).split("val").urls == (f"{url}/val-000000.tar",)
        for workers in (0, 2):
            assert keys_of(loader(url, num_workers=workers)) == keys_of(
                loader(few_shards, num_workers=workers)
            )
        fs.rm("/vaejob-test-data/few/val-000000.tar")
        with pytest.raises(DataError) as e:
            open_shards(url)
        one_line_error(e, "missing shard", f"{url}/val-000000.tar")
    finally:
        fs.rm("/vaejob-test-data", recursive=True)


def test_too_few_samples_for_the_batch(few_shards: str) -> None:
    with pytest.raises(DataError) as e:
        make_loader(few_shards, "train", 64, rank=0, world_size=2)
    one_line_error(e, "lower the batch size")


def test_empty_val_split(make_shards) -> None:
    root = make_shards("--source", "synthetic:20", "--size", "8", "--train-only")
    val = loader(root, "val")
    assert len(val) == 0 and list(val) == [] and val.epoch == 1


def test_slot_ring_waits_for_the_consumer() -> None:
    """A worker may only reuse a batch slot once the consumer has released it (a guard: the DataLoader's
    prefetch bound normally keeps workers from getting that far ahead)."""
    slots = Slots(workers=1, depth=2, shape=(1, 1, 2, 2))
    slots.acquire(0, 0)
    slots.acquire(0, 1)
    timer = threading.Timer(0.3, slots.release, (0, 0))
    timer.start()
    start = time.monotonic()
    slots.acquire(0, 2)  # slot 0 again: blocks until batch 0 is released
    assert time.monotonic() - start >= 0.25
    timer.join()
