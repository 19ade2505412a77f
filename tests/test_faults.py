"""The faults a long job meets, each tried for real: damaged checkpoints and RNG states, two writers on one run
dir, a killed launcher, a full disk, a dead job's status, offline W&B segments across requeues."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.util import REPO, cpu_env, launch_cmd, metrics, module_cmd, run, tiny_overrides, wandb_runs
from vaejob.checkpoint import verify

pytestmark = pytest.mark.slow

# constant LR: the schedule does not depend on max_steps, so a run resumed to a later max_steps is comparable.
BASE = {
    "train.max_steps": 20,
    "train.checkpoint_every": 10,
    "train.lr_schedule": "constant",
    "wandb.mode": "disabled",
}


@pytest.fixture(scope="module")
def shards(make_shards) -> str:
    return make_shards("--source", "synthetic:300", "--size", "16", "--shard-size", "50")


def train(
    shards: str, run_dir: Path, nproc: int = 1, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    return run(launch_cmd(nproc) + tiny_overrides(shards, run_dir, **{**BASE, **kw}), env=env)


def error_lines(cp: subprocess.CompletedProcess, prog: str = "vaejob.train") -> list[str]:
    return [line for line in cp.stderr.splitlines() if line.startswith(f"{prog}: error:")]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def trained(shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 20-step run with intact checkpoints at steps 10 and 20."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    cp = train(shards, run_dir)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    (dst / "lease.json").unlink(missing_ok=True)
    text = (dst / "config.yaml").read_text().replace(str(src), str(dst))
    (dst / "config.yaml").write_text(text)
    return dst


# -- a. a damaged newest checkpoint -------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty json", "not json", "another model's weights"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_resumes(
    shards, trained, tmp_path, damage
) -> None:
    run_dir = copy_run(trained, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step_00000020"
    if damage == "empty json":
        (newest / "trainer_state.json").write_text("{}")
    elif damage == "not json":
        (newest / "trainer_state.json").write_text("not json")
    else:
        other = tmp_path / "other"
        assert train(shards, other, **{"model.latent_dim": 5, "train.max_steps": 10}).returncode == 0
        shutil.copy(
            other / "checkpoints" / "step_00000010" / "model.safetensors", newest / "model.safetensors"
        )
    assert verify(str(newest)) is not None
    cp = train(shards, run_dir, **{"train.max_steps": 30})
    assert cp.returncode == 0, cp.stderr[-3000:]
    warned = [line for line in cp.stderr.splitlines() if "is damaged" in line]
    assert len(warned) == 1 and "moved to" in warned[0] and "corrupt/step_00000020" in warned[0], cp.stderr
    assert "resumed from" in cp.stderr and "step_00000010 at step 10" in cp.stderr
    assert (run_dir / "checkpoints" / "corrupt" / "step_00000020").is_dir()
    assert [r["step"] for r in metrics(run_dir, "train")][-1] == 30
    assert status(run_dir)["state"] == "completed"


def test_a_named_damaged_checkpoint_and_a_misfit_config_stop_with_one_line(shards, trained, tmp_path) -> None:
    run_dir = copy_run(trained, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step_00000020"
    (newest / "trainer_state.json").write_text("{}")
    cp = train(shards, run_dir, **{"train.max_steps": 30, "run.resume": str(newest)})
    assert cp.returncode == 2 and len(error_lines(cp)) == 1, cp.stderr[-3000:]
    assert "cannot resume from" in error_lines(cp)[0] and "trainer_state.json" in error_lines(cp)[0]
    assert "Traceback" not in cp.stderr and newest.is_dir()  # an explicit choice is never moved
    # An intact checkpoint of another config is the config's problem: one line, nothing moved aside.
    cp = train(shards, run_dir, **{"train.max_steps": 30, "model.latent_dim": 6})
    assert cp.returncode == 2 and len(error_lines(cp)) == 1, cp.stderr[-3000:]
    assert "does not fit this config" in error_lines(cp)[0] and "Traceback" not in cp.stderr
    assert (run_dir / "checkpoints" / "step_00000010").is_dir()
    assert not (run_dir / "checkpoints" / "corrupt" / "step_00000010").exists()


@pytest.mark.parametrize("module", ["evaluate", "sample"])
def test_a_evaluate_and_sample_refuse_a_damaged_checkpoint_with_one_line(trained, tmp_path, module) -> None:
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "checkpoints" / "step_00000020" / "trainer_state.json").write_text("not json")
    args = ["--run", str(run_dir)] + (
        ["--num", "4", "--out", str(tmp_path / "s")] if module == "sample" else []
    )
    cp = run(module_cmd(f"vaejob.{module}", 1) + args, timeout=120)
    assert cp.returncode == 2, cp.stderr[-3000:]
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "is damaged" in lines[0] and "step_00000020" in lines[0], cp.stderr


# -- b. a damaged RNG state ---------------------------------------------------------------------------------
@pytest.mark.parametrize("manifest", [True, False], ids=["checked-by-sha256", "legacy-no-manifest"])
def test_b_a_damaged_rng_state_is_never_resumed_silently(shards, trained, tmp_path, manifest) -> None:
    """Resuming from a checkpoint whose RNG file does not load would not be exact: it is refused (moved aside)
    and the resume from the one before is exact: the same weights as an uninterrupted run."""
    straight = tmp_path / "straight"
    assert train(shards, straight, **{"train.max_steps": 30}).returncode == 0
    run_dir = copy_run(trained, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step_00000020"
    (newest / "random_states_0.pkl").write_bytes(b"\x80\x04 not a pickle")
    if not manifest:
        for ckpt in (run_dir / "checkpoints").glob("step_*"):
            (ckpt / "checkpoint.json").unlink()
    cp = train(shards, run_dir, **{"train.max_steps": 30})
    assert cp.returncode == 0, cp.stderr[-3000:]
    warned = [line for line in cp.stderr.splitlines() if "is damaged" in line]
    assert len(warned) == 1 and "random_states_0.pkl" in warned[0], cp.stderr
    a, b = final_weights(straight), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


# -- c. two writers on one run dir --------------------------------------------------------------------------
def start(shards: str, run_dir: Path, nproc: int = 1, **kw) -> subprocess.Popen:
    cmd = launch_cmd(nproc) + tiny_overrides(shards, run_dir, **{**BASE, "train.max_steps": 100000, **kw})
    return subprocess.Popen(
        cmd, env=cpu_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (run_dir / "metrics.jsonl").exists() or len(metrics(run_dir, "train")) < n:
        assert time.time() < deadline and proc.poll() is None, (
            proc.stderr.read() if proc.poll() is not None else ""
        )
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for c in out for p in [int(c), *descendants(int(c))]]


def test_c_a_second_writer_is_refused_and_ranks_stop_when_their_launcher_dies(shards, tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = start(shards, run_dir, nproc=2)
    try:
        wait_for_steps(run_dir, 3, first)
        cp = train(shards, run_dir, **{"train.max_steps": 100000})
        assert cp.returncode == 2 and len(error_lines(cp)) == 1, cp.stderr[-3000:]
        line = error_lines(cp)[0]
        assert "is in use by pid" in line and "heartbeat" in line and "Traceback" not in cp.stderr
        ranks = descendants(first.pid)
        os.kill(first.pid, signal.SIGKILL)  # the `accelerate launch` process; its ranks must not go on alone
        killed = time.monotonic()
        while any(_alive(p) for p in ranks) and time.monotonic() - killed < 60:
            time.sleep(0.2)
        took = time.monotonic() - killed
        assert not any(_alive(p) for p in ranks), "ranks still training after their launcher died"
        print(f"ranks stopped {took:.1f} s after their launcher was killed")
    finally:
        for pid in [first.pid, *descendants(first.pid)]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    st = status(run_dir)
    assert st["state"] == "preempted" and "launcher" in st["reason"], st
    assert (run_dir / "checkpoints" / f"step_{st['step']:08d}").is_dir() and not (
        run_dir / "lease.json"
    ).exists()
    cp = train(shards, run_dir, **{"train.max_steps": st["step"] + 4})  # the next job resumes
    assert cp.returncode == 0 and f"at step {st['step']}" in cp.stderr, cp.stderr[-3000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is gone


def write_lease(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lease = {"format": "vaejob-lease/1", "host": os.uname().nodename, "token": "t", "acquired": time.time()}
    (run_dir / "lease.json").write_text(json.dumps({**lease, "heartbeat": time.time(), **fields}))


def test_c_a_stale_lease_or_the_same_slurm_job_takes_over(shards, tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lease(tmp_path / "a", pid=dead.pid, slurm_job_id=None)
    cp = train(shards, tmp_path / "a")
    assert cp.returncode == 0 and "taking over the run-dir lease of pid" in cp.stderr, cp.stderr[-3000:]
    assert "its process is gone" in cp.stderr
    write_lease(tmp_path / "b", pid=os.getpid(), slurm_job_id=None, heartbeat=time.time() - 3600)
    cp = train(shards, tmp_path / "b")
    assert cp.returncode == 0 and re.search(r"heartbeat 36\d\d s ago: its heartbeat stopped", cp.stderr), (
        cp.stderr
    )
    write_lease(tmp_path / "c", pid=os.getpid(), slurm_job_id="4242")  # alive, fresh: only its own job may
    cp = train(shards, tmp_path / "c", env=cpu_env(SLURM_JOB_ID="4242"))
    assert cp.returncode == 0 and "requeued Slurm job 4242 takes over its own run-dir lease" in cp.stderr
    write_lease(tmp_path / "d", pid=os.getpid(), slurm_job_id=None)
    cp = train(shards, tmp_path / "d")
    assert cp.returncode == 2 and "is in use by pid" in error_lines(cp)[0]
    assert not (tmp_path / "d" / "checkpoints").exists()


# -- e. a full disk -----------------------------------------------------------------------------------------
def test_e_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    shards, tmp_path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    # 2 MiB: one checkpoint of this model (1.1 MiB: weights + AdamW state) fits beside the run's other files
    # (~0.3 MiB by step 10), the second does not: the first is removed only once the second is complete.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2048k", "tmpfs", str(mnt)], check=True)
    try:
        run_dir = mnt / "run"
        kw = {
            "model.hidden_dim": 320,
            "train.max_steps": 30,
            "train.keep_checkpoints": 1,
            "wandb.mode": "offline",
        }
        cp = train(shards, run_dir, **kw)
        assert cp.returncode == 1, cp.stderr[-3000:]
        lines = error_lines(cp)
        assert len(lines) == 1 and "No space left on device" in lines[0] and "checkpoint" in lines[0], (
            cp.stderr
        )
        assert "Traceback" not in cp.stderr, cp.stderr[-3000:]
        st = status(run_dir)
        assert st["state"] == "failed" and "No space left on device" in st["reason"], st
        ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert ckpts and all(n.startswith("step_") for n in ckpts), ckpts  # no .tmp-step_* left
        assert all(verify(str(run_dir / "checkpoints" / n)) is None for n in ckpts)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- f. status of a dead job, g. W&B segments across requeues ------------------------------------------------
def test_f_g_a_killed_job_reads_as_dead_and_its_wandb_segments_sync_in_order(shards, tmp_path) -> None:
    run_dir = tmp_path / "run"
    job = start(shards, run_dir, **{"wandb.mode": "offline", "train.checkpoint_every": 5})
    wait_for_steps(run_dir, 3, job)
    live = run(module_cmd("vaejob.status", 1) + [str(run_dir)], timeout=60)
    assert live.returncode == 0 and live.stdout.startswith("running: step"), live.stdout + live.stderr
    while not list((run_dir / "checkpoints").glob("step_*/checkpoint.json")):
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    dead = run(module_cmd("vaejob.status", 1) + [str(run_dir)], timeout=60)
    assert dead.returncode == 0 and dead.stdout.startswith("dead: "), dead.stdout + dead.stderr
    assert "its process is gone" in dead.stdout and "run.resume=auto" in dead.stdout
    last = int(sorted((run_dir / "checkpoints").glob("step_*"))[-1].name.split("_")[1])
    resumed = train(shards, run_dir, **{"wandb.mode": "offline", "train.max_steps": last + 5})  # stale lease
    assert resumed.returncode == 0 and "taking over the run-dir lease" in resumed.stderr, resumed.stderr[
        -3000:
    ]
    done = run(module_cmd("vaejob.status", 1) + [str(run_dir)]).stdout
    assert done.startswith(f"completed: step {last + 5} of {last + 5}"), done

    segments = wandb_runs(run_dir)  # one offline dir per job segment, one run id
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert len(segments) == 2 and all(s.endswith(f"-{run_id}") for s in segments)
    sync = run(module_cmd("vaejob.status", 1) + [str(run_dir), "--wandb-sync"])
    assert sync.returncode == 0 and sync.stdout.strip() == f"wandb sync {segments[0]} {segments[1]}", (
        sync.stdout
    )
    dry = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", *segments],
        capture_output=True, text=True, timeout=120, env=cpu_env(),
    )  # fmt: skip
    listed = [
        line.split()[-1] for line in (dry.stdout + dry.stderr).splitlines() if line.strip().endswith(".wandb")
    ]
    assert dry.returncode == 0 and [str(Path(p).parent) for p in listed] == segments, dry.stdout + dry.stderr


def test_an_empty_val_split_is_refused_before_training(make_shards, tmp_path) -> None:
    no_val = make_shards("--source", "synthetic:40", "--size", "16", "--train-only")
    cp = train(no_val, tmp_path / "run")
    assert cp.returncode == 2 and len(error_lines(cp)) == 1 and "val split" in error_lines(cp)[0], cp.stderr
    assert not (tmp_path / "run").exists()


# -- h. W&B online without an API key ----------------------------------------------------------------------
def tree_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` (``"/"`` for a directory), but the names in ``skip``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
        if p.name not in skip
    }


@pytest.mark.parametrize("launcher", ["python", "accelerate-1", "accelerate-2"])
def test_h_wandb_online_without_a_key_is_one_line_exit_2_on_every_rank(
    shards, trained, tmp_path, launcher
) -> None:
    """No key (empty HOME, no WANDB_API_KEY): every rank exits 2 before training, rank 0 says why in one line
    and in status.json; the run it was to resume loses nothing (config, metrics, W&B id, checkpoints)."""
    run_dir = copy_run(trained, tmp_path / "run")
    before = tree_hashes(run_dir, skip=("status.json",))
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in cpu_env(HOME=str(tmp_path / "home")).items() if k != "WANDB_API_KEY"}
    nproc = 2 if launcher == "accelerate-2" else 1
    cmd = launch_cmd(nproc, accelerate=launcher != "python")
    cp = run(
        cmd + tiny_overrides(shards, run_dir, **{**BASE, "train.max_steps": 30, "wandb.mode": "online"}), env
    )
    line = "vaejob.train: error: wandb.mode=online but no W&B API key: run `wandb login`, set WANDB_API_KEY, "
    assert error_lines(cp) == [line + "or use wandb.mode=offline and `wandb sync` later"], cp.stderr[-3000:]
    assert not re.search(r'File ".*/vaejob/', cp.stderr), cp.stderr[-3000:]  # no rank's traceback
    if launcher == "python":
        assert cp.returncode == 2 and cp.stderr.count("\n") == 1, cp.stderr
    else:  # accelerate's launcher exits 1 when a rank fails, and says how each rank exited
        pattern = r"non-zero exit status (-?\d+)\." if nproc == 1 else r"^\s*exitcode\s*: (-?\d+) \(pid"
        codes = re.findall(pattern, cp.stderr, re.M)
        assert cp.returncode == 1 and codes == ["2"] * nproc, cp.stderr[-3000:]
    state = status(run_dir)
    assert (state["state"], state["step"]) == ("failed", 20) and line[
        len("vaejob.train: error: ") :
    ] in state["reason"]
    assert state["run_id"] == (run_dir / "wandb_id.txt").read_text().strip()
    assert tree_hashes(run_dir, skip=("status.json",)) == before


@pytest.mark.parametrize("nproc", [1, 2])
def test_h_evaluate_without_a_key_stops_every_rank_with_one_line(trained, tmp_path, nproc) -> None:
    run_dir = copy_run(trained, tmp_path / "run")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("mode: disabled", "mode: online"))
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in cpu_env(HOME=str(tmp_path / "home")).items() if k != "WANDB_API_KEY"}
    cp = run(module_cmd("vaejob.evaluate", nproc) + ["--run", str(run_dir), "--iw-samples", "2"], env, 120)
    lines = error_lines(cp, "vaejob.evaluate")
    assert len(lines) == 1 and "wandb.mode=online but no W&B API key" in lines[0], cp.stderr[-3000:]
    assert not re.search(r'File ".*/vaejob/', cp.stderr) and cp.stdout == "", cp.stderr[-3000:]
    codes = [cp.returncode] if nproc == 1 else re.findall(r"^\s*exitcode\s*: (-?\d+) \(pid", cp.stderr, re.M)
    assert codes == ([2] if nproc == 1 else ["2", "2"]), cp.stderr[-3000:]
    assert not (run_dir / "eval").exists()
