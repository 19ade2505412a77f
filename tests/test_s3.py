"""Object storage for real: a live S3-protocol server on 127.0.0.1 (moto's, with signature checks) reached
through s3fs with an endpoint URL and throwaway credentials. Shards in, samples out, faults and secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.foreign import write_foreign_shards
from tests.s3server import BUCKET, S3Server
from tests.util import (
    REPO,
    cpu_env,
    flat,
    keys_of,
    launch_cmd,
    loader,
    metrics,
    module_cmd,
    run,
    tiny_overrides,
)
from vaejob import storage
from vaejob.checkpoint import verify
from vaejob.shard import main as shard_main
from vaejob.shards import open_shards

TINY = [
    "--source",
    "synthetic:300",
    "--size",
    "16",
    "--shard-size",
    "40",
    "--val-fraction",
    "0.2",
]  # = tiny_shards
URL = f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    pytest.importorskip("moto", reason="the dev extra's moto[server] runs the S3 test server")
    pytest.importorskip("s3fs", reason="the s3 extra: pip install 'vaejob[s3]'")
    server = S3Server(auth=True)
    try:
        server.start()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"cannot start the moto S3 server: {e}")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # this process's client reaches this server
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_tiny(s3: S3Server) -> str:
    """The tiny_shards set, sharded straight to s3://."""
    assert shard_main([*TINY, "--out", f"{URL}/tiny", "--workers", "2"]) == 0
    return f"{URL}/tiny"


def s3_env(s3: S3Server, **extra: str) -> dict[str, str]:
    return cpu_env(**{**s3.env(), **extra})


# ------------------------------------------------------------------------------------------- shards in
def test_shard_straight_to_s3_is_the_local_set_byte_for_byte(s3, s3_tiny, tiny_shards, capsys) -> None:
    objects = s3.objects("tiny")
    local = {p.name: p.read_bytes() for p in Path(tiny_shards).iterdir()}
    assert objects == local  # no temp objects, nothing else, same bytes (manifest included)
    capsys.readouterr()
    assert shard_main([*TINY, "--out", s3_tiny]) == 2  # a set is there
    assert "pass --overwrite" in capsys.readouterr().err
    assert shard_main([*TINY, "--seed", "1", "--out", s3_tiny, "--overwrite"]) == 0
    again = s3.objects("tiny")
    assert set(again) == set(local) and again != local  # replaced whole
    assert shard_main([*TINY, "--out", s3_tiny, "--overwrite"]) == 0
    assert s3.objects("tiny") == local

    # a job array writing into the bucket, then --finalize: the same manifest as a single run
    for i in range(3):
        assert shard_main([*TINY, "--out", f"{URL}/array", "--task-index", str(i), "--num-tasks", "3"]) == 0
    assert shard_main(["--finalize", "--out", f"{URL}/array"]) == 0
    assert s3.objects("array") == local


def test_loader_and_index_on_s3(s3, s3_tiny, tiny_shards, tmp_path) -> None:
    shards = open_shards(s3_tiny, verify=True)
    assert shards.split("val").urls[0] == f"{s3_tiny}/val-000000.tar"
    for workers in (0, 2):
        a, b = (
            loader(s3_tiny, num_workers=workers, raw=True),
            loader(tiny_shards, num_workers=workers, raw=True),
        )
        for x, y in zip(a, b, strict=True):
            assert x["key"] == y["key"] and x["image"].equal(y["image"])

    tars = tmp_path / "tars"
    write_foreign_shards(tars)
    s3.upload_dir(str(tars), "foreign")
    assert shard_main(["--index", f"{URL}/foreign/data-{{00000..00002}}.tar", "--workers", "2"]) == 0
    assert shard_main(["--index", str(tars)]) == 0
    remote = json.loads(s3.objects("foreign")["manifest.json"])
    assert remote["splits"] == json.loads((tars / "manifest.json").read_text())["splits"]
    keys = flat(keys_of(loader(open_shards(f"{URL}/foreign", image_size=16), num_workers=2)))
    assert keys == flat(keys_of(loader(open_shards(str(tars), image_size=16), num_workers=2)))


# ------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_two_processes_train_from_s3_resume_exactly_and_write_samples_there(s3, s3_tiny, tmp_path) -> None:
    env = s3_env(s3)
    kw = {"train.max_steps": 40, "data.num_workers": 2}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    cp = run(
        launch_cmd(2) + tiny_overrides(s3_tiny, straight, **kw, **{"samples.root": f"{URL}/runs/straight"}),
        env=env,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    # Killed hard (the whole process group, no chance to clean up) once its step-10 checkpoint exists.
    crash_kw = {**kw, "samples.root": f"{URL}/runs/crashed"}
    proc = subprocess.Popen(
        launch_cmd(2) + tiny_overrides(s3_tiny, crashed, **crash_kw),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while not (crashed / "checkpoints" / "step_00000010" / "checkpoint.json").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((crashed / "status.json").read_text())["state"] == "running"  # it died mid-run
    cp = run(launch_cmd(2) + tiny_overrides(s3_tiny, crashed, **crash_kw), env=env)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "resumed from" in cp.stderr
    ma, mb = metrics(straight), metrics(crashed)
    assert [(r["step"], r["split"]) for r in ma] == [(r["step"], r["split"]) for r in mb]  # no gap, no repeat
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4), ra["step"]

    outputs = s3.objects("runs/straight")
    assert {"samples/step_00000010/meta.json", "samples/step_00000040/samples.png"} <= set(outputs)
    assert any(n.startswith("plots/") and n.endswith(".png") for n in outputs)
    assert not any(".tmp" in n for n in outputs)  # written to their final keys
    step40 = "samples/step_00000040/samples.npy"
    assert outputs[step40] == s3.objects("runs/crashed")[step40]  # the resumed run's samples: the same

    # credentials never reach a log, config.yaml, metrics.jsonl, status or W&B
    for path in straight.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert s3.secret.encode() not in data and s3.key_id.encode() not in data, path
    assert s3.secret not in cp.stdout + cp.stderr and s3.key_id not in cp.stdout + cp.stderr


@pytest.mark.slow
def test_sample_to_s3_is_byte_identical_and_resumes_after_a_kill(s3, tiny_run, tmp_path) -> None:
    args = ["--run", str(tiny_run), "--num", "400", "--shard-size", "20", "--batch-size", "20", "--seed", "5"]
    local = tmp_path / "local"
    cp = run(module_cmd("vaejob.sample", 1) + [*args, "--out", str(local)])
    assert cp.returncode == 0, cp.stderr[-3000:]
    out = f"{URL}/samples"
    proc = subprocess.Popen(
        module_cmd("vaejob.sample", 1) + [*args, "--out", out],
        env=s3_env(s3),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while "parts/samples-000002.json" not in s3.objects("samples"):
        assert time.time() < deadline and proc.poll() is None, "vaejob.sample ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = s3.objects("samples")
    assert "manifest.json" not in interrupted and not any(".tmp" in n for n in interrupted)
    cp = run(module_cmd("vaejob.sample", 1) + [*args, "--out", out], env=s3_env(s3))
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert "already complete" in cp.stderr
    remote = s3.objects("samples")
    for p in local.iterdir():
        if p.is_file():
            assert remote[p.name] == p.read_bytes(), p.name


@pytest.mark.slow
def test_evaluate_reads_shards_from_s3(s3, s3_tiny, tiny_run, tiny_shards) -> None:
    def evaluate(shards: str) -> dict:
        cp = run(
            module_cmd("vaejob.evaluate", 1)
            + ["--run", str(tiny_run), "--shards", shards, "--iw-samples", "4"],
            env=s3_env(s3),
        )
        assert cp.returncode == 0, cp.stderr[-3000:]
        return json.loads(cp.stdout[cp.stdout.index("{") :])

    remote, local = evaluate(s3_tiny), evaluate(tiny_shards)
    for key in ("nelbo", "iw_nll", "count", "active_units"):
        assert remote[key] == pytest.approx(local[key], rel=1e-6), key


# ------------------------------------------------------------------------------------------- faults
def test_wrong_credentials_or_a_missing_bucket_is_one_line_before_anything_starts(
    s3, s3_tiny, tmp_path
) -> None:
    base = tiny_overrides(s3_tiny, tmp_path / "run")
    cases = [
        (s3_env(s3, AWS_SECRET_ACCESS_KEY="not-the-secret"), base, "access denied"),
        (
            s3_env(s3),
            [*base, "data.shards=s3://no-such-bucket/tiny"],
            "bucket 'no-such-bucket' does not exist",
        ),
        (s3_env(s3), [*base, "samples.root=s3://no-such-bucket/out"], "samples.root s3://no-such-bucket/out"),
    ]
    for env, overrides, message in cases:
        cp = run(launch_cmd(1) + overrides, env=env, timeout=120)
        lines = cp.stderr.strip().splitlines()
        assert cp.returncode == 2 and len(lines) == 1 and message in lines[0], cp.stderr[-2000:]
        assert "AWS_ENDPOINT_URL" in lines[0] or "does not exist" in lines[0]
        assert "not-the-secret" not in cp.stderr and s3.secret not in cp.stderr
        assert not (tmp_path / "run").exists()  # nothing started, nothing written
    cp = run(
        [sys.executable, "-m", "vaejob.shard", *TINY, "--out", "s3://no-such-bucket/x"],
        env=s3_env(s3),
        timeout=120,
    )
    assert cp.returncode == 2 and "does not exist" in cp.stderr and cp.stderr.count("\n") == 1, cp.stderr


@pytest.mark.slow
def test_the_endpoint_going_away_mid_epoch_fails_in_one_line_after_bounded_retries(tmp_path) -> None:
    pytest.importorskip("moto", reason="the dev extra's moto[server] runs the S3 test server")
    server = S3Server(auth=False, bucket="vaejob-fault").start()  # its own server: this test stops it
    try:
        env = cpu_env(**server.env())
        url = "s3://vaejob-fault/big"
        cp = run(
            [
                sys.executable,
                "-m",
                "vaejob.shard",
                "--source",
                "synthetic:2000",
                "--size",
                "16",
                "--shard-size",
                "25",
                "--out",
                url,
            ],
            env=env,
        )
        assert cp.returncode == 0, cp.stderr[-2000:]
        run_dir = tmp_path / "run"
        over = tiny_overrides(
            url,
            run_dir,
            **{
                "train.max_steps": 100000,
                "train.checkpoint_every": 5,
                "train.eval_every": 100000,
                "train.sample_every": 100000,
                "data.io_retries": 2,
                "data.io_backoff_s": 0.2,
            },
        )
        proc = subprocess.Popen(
            launch_cmd(1) + over, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.time() + 180
        while not (run_dir / "checkpoints" / "step_00000010" / "checkpoint.json").exists():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        server.stop()  # mid-epoch: 72 train shards, a few read so far
        stopped = time.time()
        _, err = proc.communicate(timeout=240)
        took = time.time() - stopped
    finally:
        server.stop()
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 1, err[-3000:]
    assert last.startswith("vaejob.train: error: storage failed:") and "s3://vaejob-fault/big/" in last, last
    assert "after 3 tries" in last and "the last complete checkpoint is" in last, last
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "storage failed" in status["reason"]
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert verify(str(newest)) is None  # the last checkpoint is intact
    print(f"endpoint gone: the job ended {took:.1f} s after the server stopped; its last line:\n{last}")


def test_object_store_writes_go_to_the_final_key_and_a_failed_write_leaves_nothing(s3) -> None:
    path = f"{URL}/writes/blob.bin"
    storage.atomic_write_bytes(path, b"x" * 1000)
    with pytest.raises(RuntimeError):
        with storage.open_write(path) as f:
            f.write(b"y" * (6 << 20))  # past s3fs's 5 MiB block: a multipart upload is under way
            raise RuntimeError("the writer dies mid-object")
    assert s3.objects("writes") == {"blob.bin": b"x" * 1000}  # the old object, no temp, no half object
    with storage.open_write(path) as f:
        f.write(b"z" * (12 << 20))  # multipart, completed
    assert s3.objects("writes") == {"blob.bin": b"z" * (12 << 20)}
    uploads = s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert uploads == []  # the failed one was aborted
