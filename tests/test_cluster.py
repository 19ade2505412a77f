"""The cluster launchers on a real one-node Slurm (slurm/ci-up.sh): slurm/train.sh, launch/submit.py,
slurm/shard.sh; preemption and requeue; submitit's local executor. No fakes: real sbatch, sacct, scancel,
scontrol requeue, 2 training processes over gloo. Every wait is bounded; on failure the job's logs are shown.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.util import REPO, metrics, tiny_overrides, wandb_runs, write_shard_set

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
}
# Long enough that a stop signal sent after the first checkpoint lands well before the end, short enough
# for ~10 s of CPU per attempt. log_every=1: every train step has a metrics record to check.
PREEMPT = {
    "train.max_steps": 300,
    "train.log_every": 1,
    "train.checkpoint_every": 25,
    "train.eval_every": 100,
    "train.sample_every": 100,
}
FIRST_CKPT = "step_00000025"


# -- cluster and helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm() -> str:
    """The one-node cluster of slurm/ci-up.sh (started here if needed, stopped again if this started it)."""
    if shutil.which("scontrol"):
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
        was_up = ping.returncode == 0 and "UP" in ping.stdout
    else:
        was_up = False
    cp = subprocess.run(
        ["bash", str(REPO / "slurm" / "ci-up.sh")], capture_output=True, text=True, timeout=900
    )
    if cp.returncode == 3:
        pytest.skip(f"no local Slurm cluster: {cp.stderr.strip()}")
    assert cp.returncode == 0, f"slurm/ci-up.sh failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}"
    yield cp.stdout.strip()
    if not was_up:
        subprocess.run(["bash", str(REPO / "slurm" / "ci-up.sh"), "stop"], capture_output=True, timeout=120)


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job finds this venv's python/accelerate
    env.update(WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def sh(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)


def states(job_id: str) -> list[str]:
    """The job's states, one per run (a requeued job has one REQUEUED row per requeue)."""
    cp = sh(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State"])
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()] if cp.returncode == 0 else []


class Job:
    def __init__(self, job_id: str, logs: list[Path]):
        self.id, self.logs = job_id, logs

    def describe(self) -> str:
        queue = sh(["squeue", "-a"]).stdout
        out = [f"job {self.id}: sacct states {states(self.id)}; squeue:\n{queue}"]
        for pattern in self.logs:
            found = sorted(pattern.parent.glob(pattern.name))
            for p in found:
                out.append(f"----- {p} (last 4000 chars)\n{p.read_text(errors='replace')[-4000:]}")
            if not found:
                out.append(f"----- {pattern}: no such file")
        return "\n".join(out)

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                sh(["scancel", self.id])
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.describe()}")
            time.sleep(0.2)

    def wait_done(self, timeout: float = 240) -> str:
        """Wait until the job's latest run reaches a terminal state (sacct lags job end by ~1 s)."""
        self.wait_for("the job to finish", lambda: (states(self.id) or [""])[-1] in TERMINAL, timeout)
        return states(self.id)[-1]


def sbatch_train(tmp: Path, overrides: list[str], *sbatch_args: str) -> Job:
    cp = sh(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            "--time=10",
            f"--output={tmp}/%x-%j.out",
            f"--error={tmp}/%x-%j.err",
            *sbatch_args,
            str(REPO / "slurm" / "train.sh"),
            *overrides,
        ],
        env=job_env(VAEJOB_PROCS_PER_NODE="2"),
    )
    assert cp.returncode == 0, f"sbatch failed: {cp.stdout}{cp.stderr}"
    job_id = cp.stdout.strip().split(";")[0]
    return Job(job_id, [tmp / f"vaejob-{job_id}.out", tmp / f"vaejob-{job_id}.err"])


def submit(tmp: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, Job | None]:
    cp = sh([sys.executable, "launch/submit.py", *args], timeout=timeout, env=job_env())
    m = re.search(r"submitted \w+ job (\S+):", cp.stdout)
    if m is None:
        return cp, None
    folder = Path(re.search(r"stdout: +(\S+)", cp.stdout).group(1)).parent
    return cp, Job(m.group(1), [folder / f"{m.group(1)}_*_log.out", folder / f"{m.group(1)}_*_log.err"])


SLURM_2_TASKS = [
    "--cluster",
    "slurm",
    "--gpus-per-node",
    "0",
    "--tasks-per-node",
    "2",
    "--cpus-per-task",
    "1",
]


def assert_complete_run(run_dir: Path, max_steps: int, job: Job, processes: int = 2) -> None:
    """What a finished run leaves behind: checkpoints, samples, metrics, one offline W&B run id."""
    info = job.describe
    train_steps = [r["step"] for r in metrics(run_dir, "train")]
    assert train_steps and train_steps[-1] == max_steps, info()
    assert (run_dir / "checkpoints" / f"step_{max_steps:08d}").is_dir(), info()
    assert any((run_dir / "samples").iterdir()), info()
    assert metrics(run_dir, "val"), info()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = wandb_runs(run_dir)
    assert runs and all(r.endswith(f"-{run_id}") for r in runs), (runs, run_id, info())
    logs = "".join(p.read_text(errors="replace") for g in job.logs for p in g.parent.glob(g.name))
    assert f"{processes} process(es) x batch" in logs, info()  # the ranks formed one process group


def assert_resumed(run_dir: Path, max_steps: int, job: Job) -> None:
    """One preemption: steps 1..max_steps exactly once, two W&B sessions of ONE run id."""
    info = job.describe
    assert states(job.id)[:-1] == ["REQUEUED"], info()
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, max_steps + 1)), info()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = wandb_runs(run_dir)
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), (runs, run_id, info())
    logs = "".join(p.read_text(errors="replace") for g in job.logs for p in g.parent.glob(g.name))
    assert re.search(r"resumed from \S+/step_\d{8} at step \d+", logs), info()


# -- slurm/train.sh --------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_sbatch_train_two_processes_completes(slurm, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch_train(tmp_path, tiny_overrides(tiny_shards, run_dir))
    assert job.wait_done() == "COMPLETED", job.describe()
    assert_complete_run(run_dir, 20, job)


@pytest.mark.slurm
def test_sbatch_bad_data_fails_clearly(slurm, tmp_path):
    job = sbatch_train(tmp_path, tiny_overrides(str(tmp_path / "no-such-shards"), tmp_path / "run"))
    start = time.monotonic()
    assert job.wait_done(timeout=120) == "FAILED", job.describe()
    assert time.monotonic() - start < 90, job.describe()
    err = (tmp_path / f"vaejob-{job.id}.err").read_text()
    assert "vaejob.train: error:" in err and "no-such-shards" in err, job.describe()


@pytest.mark.slurm
def test_sbatch_usr1_checkpoints_requeues_and_resumes(slurm, tiny_shards, tmp_path, record_property):
    """Slurm's time-limit warning path: USR1 to the batch shell -> checkpoint, exit 75, requeue, resume."""
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job = sbatch_train(tmp_path, tiny_overrides(tiny_shards, run_dir, **PREEMPT))
    job.wait_for("the first checkpoint", (run_dir / "checkpoints" / FIRST_CKPT).is_dir, timeout=180)
    cp = sh(["scancel", "--signal=USR1", "--batch", job.id])
    assert cp.returncode == 0, cp.stderr
    assert job.wait_done() == "COMPLETED", job.describe()
    wall = time.monotonic() - start
    record_property("preemption_wall_s", round(wall, 1))
    print(f"sbatch preemption test: {wall:.1f} s from sbatch to COMPLETED after one requeue")
    assert_resumed(run_dir, PREEMPT["train.max_steps"], job)
    out = (tmp_path / f"vaejob-{job.id}.err").read_text()
    stop = re.search(r"checkpointed at step (\d+) after a stop signal; exiting 75", out)
    assert stop and 25 <= int(stop.group(1)) < PREEMPT["train.max_steps"], job.describe()
    assert f"resumed from {run_dir}/checkpoints/step_{int(stop.group(1)):08d}" in out, job.describe()
    assert_complete_run(run_dir, PREEMPT["train.max_steps"], job)


# -- launch/submit.py ------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_submitit_dry_run_prints_the_sbatch_script(slurm, tiny_shards, tmp_path):
    cp, job = submit(tmp_path, *SLURM_2_TASKS, "--dry-run", *tiny_overrides(tiny_shards, tmp_path / "run"))
    assert cp.returncode == 0 and job is None, cp.stdout + cp.stderr
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "srun "):
        assert line in cp.stdout, cp.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slurm
def test_submitit_slurm_two_tasks_completes(slurm, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cp, job = submit(
        tmp_path, *SLURM_2_TASKS, "--time", "10", "--wait", *tiny_overrides(tiny_shards, run_dir)
    )
    assert job is not None, cp.stdout + cp.stderr
    assert cp.returncode == 0, cp.stdout + cp.stderr + job.describe()
    assert f"run dir: {run_dir}" in cp.stdout
    assert job.wait_done(timeout=30) == "COMPLETED", job.describe()
    assert_complete_run(run_dir, 20, job)


@pytest.mark.slurm
def test_submitit_failures_are_clear(slurm, tiny_shards, tmp_path):
    # A bad key fails on the submit host, before anything is queued.
    cp, job = submit(
        tmp_path, *SLURM_2_TASKS, *tiny_overrides(tiny_shards, tmp_path / "a"), "train.lr_typo=1"
    )
    assert cp.returncode == 2 and job is None, cp.stdout + cp.stderr
    assert "unknown config key 'train.lr_typo'" in cp.stderr
    # Data missing on the nodes: the job fails, --wait reports it and exits 1.
    missing = str(tmp_path / "no-such-shards")
    cp, job = submit(
        tmp_path, *SLURM_2_TASKS, "--time", "10", "--wait", *tiny_overrides(missing, tmp_path / "b")
    )
    assert job is not None, cp.stdout + cp.stderr
    assert cp.returncode == 1, cp.stdout + cp.stderr + job.describe()
    assert "vaejob.train exited with 2" in cp.stderr, cp.stderr
    assert job.wait_done(timeout=60) == "FAILED", job.describe()


@pytest.mark.slurm
def test_submitit_interrupt_requeues_and_resumes(slurm, tiny_shards, tmp_path, record_property):
    """submitit's preemption simulation (SIGTERM, then SIGUSR2) -> checkpoint() -> requeue -> resume."""
    import submitit

    run_dir = tmp_path / "run"
    start = time.monotonic()
    cp, job = submit(
        tmp_path, *SLURM_2_TASKS, "--time", "10", *tiny_overrides(tiny_shards, run_dir, **PREEMPT)
    )
    assert cp.returncode == 0 and job is not None, cp.stdout + cp.stderr
    job.wait_for("the first checkpoint", (run_dir / "checkpoints" / FIRST_CKPT).is_dir, timeout=180)
    sjob = submitit.SlurmJob(folder=run_dir / "submitit", job_id=job.id, tasks=[0, 1])
    sjob._interrupt()
    assert job.wait_done() == "COMPLETED", job.describe()
    wall = time.monotonic() - start
    record_property("submitit_preemption_wall_s", round(wall, 1))
    print(f"submitit preemption test: {wall:.1f} s from submit to COMPLETED after one requeue")
    assert [r["exit_code"] for r in sjob.results()] == [0, 0], job.describe()
    assert_resumed(run_dir, PREEMPT["train.max_steps"], job)
    logs = "".join(p.read_text(errors="replace") for g in job.logs for p in g.parent.glob(g.name))
    assert "Calling checkpoint method" in logs and f"Requeued job {job.id}" in logs, job.describe()
    assert_complete_run(run_dir, PREEMPT["train.max_steps"], job)


def test_submitit_local_two_processes(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cp, job = submit(
        tmp_path,
        *["--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10"],
        *tiny_overrides(tiny_shards, run_dir),
    )
    assert job is not None, cp.stdout + cp.stderr
    assert cp.returncode == 0, cp.stdout + cp.stderr + job.describe()
    assert_complete_run(run_dir, 20, job)


# -- slurm/shard.sh --------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_shard_job_array_matches_single_process(slurm, tmp_path):
    args = ["--source", "synthetic:300", "--size", "16", "--shard-size", "40", "--val-fraction", "0.2"]
    write_shard_set(*args, out=tmp_path / "single")
    cp = sh(
        [
            "bash",
            "slurm/shard.sh",
            "--cpus-per-task=1",
            "--mem=1G",
            "--time=10",
            f"--chdir={tmp_path}",
            "3",
            *args,
        ]
        + ["--out", str(tmp_path / "array")],
        env=job_env(),
    )
    assert cp.returncode == 0, cp.stdout + cp.stderr
    array, final = re.search(r"array job (\d+) \(3 tasks\).*finalize job (\d+)", cp.stdout).groups()
    job = Job(final, [tmp_path / "vaejob-shard-*.out", tmp_path / "vaejob-shard-finalize-*.out"])
    assert job.wait_done(timeout=120) == "COMPLETED", job.describe()
    # afterok means every task succeeded; accounting lists them a moment later
    job.wait_for("sacct to list 3 COMPLETED tasks", lambda: states(array) == ["COMPLETED"] * 3, timeout=30)
    single, arr = tmp_path / "single", tmp_path / "array"
    assert (arr / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes(), job.describe()
    tars = sorted(p.name for p in single.glob("*.tar"))
    assert tars == sorted(p.name for p in arr.glob("*.tar")) and len(tars) > 3
    assert all((arr / t).read_bytes() == (single / t).read_bytes() for t in tars)
