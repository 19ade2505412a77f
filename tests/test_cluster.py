"""The cluster launchers on a real one-node Slurm (slurm/ci-up.sh): slurm/train.sh, launch/submit.py,
slurm/shard.sh; preemption and requeue; submitit's local executor. No fakes: real sbatch, sacct, scancel,
scontrol requeue, 2 training processes over gloo. Every wait is bounded; on failure the job's logs are shown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.util import REPO, launch_cmd, metrics, run, tiny_overrides, wandb_runs, write_shard_set
from vaejob.checkpoint import verify

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
    """The two-node cluster of slurm/ci-up.sh --nodes 2 (started here if needed, stopped again if this
    started it): vaejob-n1 and vaejob-n2, each slurmd in its own network namespace."""
    if shutil.which("scontrol"):
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
        was_up = ping.returncode == 0 and "UP" in ping.stdout
    else:
        was_up = False
    cp = subprocess.run(
        ["bash", str(REPO / "slurm" / "ci-up.sh"), "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=900,
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


def sbatch_train(
    tmp: Path, overrides: list[str], *sbatch_args: str, procs: int = 2, env: dict[str, str] | None = None
) -> Job:
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
        env=job_env(VAEJOB_PROCS_PER_NODE=str(procs), **(env or {})),
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


@pytest.mark.slurm
def test_sbatch_first_run_keeps_a_named_checkpoint_and_the_requeue_resumes_auto(slurm, tiny_shards, tmp_path):
    """A rollback through slurm/train.sh: the first run resumes the user's run.resume=PATH (and quarantines
    the newer checkpoint); the requeued run (SLURM_RESTART_COUNT=1) resumes auto, from the rollback's own."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    cp = run(launch_cmd(1) + tiny_overrides(tiny_shards, run_dir, **{**PREEMPT, "train.max_steps": 50}))
    assert cp.returncode == 0, cp.stderr[-3000:]
    rollback = f"run.resume={ckpts / FIRST_CKPT}"
    job = sbatch_train(tmp_path, [*tiny_overrides(tiny_shards, run_dir, **PREEMPT), rollback], procs=1)
    job.wait_for(
        "the rollback's own step-50 checkpoint",
        lambda: (ckpts / "abandoned" / "step_00000050").is_dir() and (ckpts / "step_00000050").is_dir(),
        timeout=180,
    )
    assert sh(["scancel", "--signal=USR1", "--batch", job.id]).returncode == 0
    assert job.wait_done() == "COMPLETED", job.describe()
    assert states(job.id)[:-1] == ["REQUEUED"], job.describe()
    err = (tmp_path / f"vaejob-{job.id}.err").read_text()
    assert f"resumed from {ckpts}/{FIRST_CKPT} at step 25" in err, job.describe()
    stop = re.search(r"checkpointed at step (\d+) after a stop signal; exiting 75", err)
    assert stop and int(stop.group(1)) >= 50, job.describe()
    assert f"resumed from {ckpts}/step_{int(stop.group(1)):08d} at step {stop.group(1)}" in err, (
        job.describe()
    )
    assert "Traceback" not in err, job.describe()  # one process runs without accelerate's launcher (train.sh)
    rollbacks = [line for line in err.splitlines() if "older than the run dir's newest" in line]
    assert len(rollbacks) == 1, "\n".join(rollbacks) + "\n" + job.describe()
    assert sorted(p.name for p in (ckpts / "abandoned").iterdir()) == [
        "metrics-after-step_00000025.jsonl",
        "step_00000050",
    ]
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, PREEMPT["train.max_steps"] + 1))


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


# -- two nodes ---------------------------------------------------------------------------------------------
RANK_LINE = re.compile(
    r"rank (\d)/(\d) \(machine (\d), local rank \d, pid (\d+)\) on (\S+): (\d+) batches per epoch"
)
FINISH_LINE = re.compile(
    r"rank (\d)/\d \(machine \d, local rank \d, pid \d+\) on (\S+): finished at step (\d+), weights sha256 (\w+)"
)
STOP_LINE = re.compile(
    r"rank (\d)/\d \(.*\) on (\S+): checkpointed at step (\d+) after a stop signal; exiting 75"
)
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1")


def job_log(job: Job) -> str:
    return "".join(p.read_text(errors="replace") for g in job.logs for p in sorted(g.parent.glob(g.name)))


def rank_lines(job: Job) -> dict[int, tuple[int, int, str, int]]:
    """rank -> (machine rank, pid, node name, batches per epoch), from each rank's own start line."""
    return {int(m[0]): (int(m[2]), int(m[3]), m[4], int(m[5])) for m in RANK_LINE.findall(job_log(job))}


def assert_two_nodes(job: Job, steps: int) -> None:
    ranks = rank_lines(job)
    assert sorted(ranks) == [0, 1], job.describe()
    assert {ranks[r][0] for r in ranks} == {0, 1}, ranks  # machine ranks 0 and 1 (accelerate#2816: all 0)
    assert {ranks[r][2] for r in ranks} == {"vaejob-n1", "vaejob-n2"}, ranks  # on two different nodes
    assert ranks[0][3] == ranks[1][3] > 0, ranks  # the same batch count on both
    finished = {int(m[0]): m for m in FINISH_LINE.findall(job_log(job))}
    assert sorted(finished) == [0, 1] and {int(m[2]) for m in finished.values()} == {steps}, job.describe()
    assert finished[0][3] == finished[1][3], finished  # identical weights on both nodes at the end


@pytest.mark.slurm
def test_two_nodes_sbatch_completes(slurm, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch_train(tmp_path, tiny_overrides(tiny_shards, run_dir), *TWO_NODES, procs=1)
    assert job.wait_done() == "COMPLETED", job.describe()
    assert_complete_run(run_dir, 20, job)
    assert_two_nodes(job, 20)


@pytest.mark.slurm
def test_two_nodes_usr1_preemption_continues_like_an_uninterrupted_run(slurm, tiny_shards, tmp_path):
    straight_dir, run_dir = tmp_path / "straight" / "run", tmp_path / "run"
    (tmp_path / "straight").mkdir()
    straight = sbatch_train(
        tmp_path / "straight", tiny_overrides(tiny_shards, straight_dir, **PREEMPT), *TWO_NODES, procs=1
    )
    job = sbatch_train(tmp_path, tiny_overrides(tiny_shards, run_dir, **PREEMPT), *TWO_NODES, procs=1)
    job.wait_for("the first checkpoint", (run_dir / "checkpoints" / FIRST_CKPT).is_dir, timeout=240)
    assert sh(["scancel", "--signal=USR1", "--batch", job.id]).returncode == 0
    assert job.wait_done(timeout=300) == "COMPLETED", job.describe()
    assert straight.wait_done(timeout=300) == "COMPLETED", straight.describe()
    stops = STOP_LINE.findall(job_log(job))
    assert {(int(r), n) for r, n, _ in stops} == {(0, "vaejob-n1"), (1, "vaejob-n2")}, job.describe()
    assert len({s for *_, s in stops}) == 1, stops  # both nodes checkpointed at the same step
    assert_resumed(run_dir, PREEMPT["train.max_steps"], job)
    assert_two_nodes(job, PREEMPT["train.max_steps"])
    a, b = metrics(straight_dir), metrics(run_dir)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]


@pytest.mark.slurm
def test_two_nodes_submitit_completes_and_requeues(slurm, tiny_shards, tmp_path):
    import submitit

    run_dir = tmp_path / "run"
    nodes = [
        "--cluster",
        "slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "1",
        "--cpus-per-task",
        "1",
    ]
    cp, job = submit(tmp_path, *nodes, "--time", "10", *tiny_overrides(tiny_shards, run_dir, **PREEMPT))
    assert cp.returncode == 0 and job is not None, cp.stdout + cp.stderr
    job.wait_for("the first checkpoint", (run_dir / "checkpoints" / FIRST_CKPT).is_dir, timeout=240)
    sjob = submitit.SlurmJob(folder=run_dir / "submitit", job_id=job.id, tasks=[0, 1])
    sjob._interrupt()
    assert job.wait_done(timeout=300) == "COMPLETED", job.describe()
    assert [r["exit_code"] for r in sjob.results()] == [0, 0], job.describe()
    assert_resumed(run_dir, PREEMPT["train.max_steps"], job)
    assert_two_nodes(job, PREEMPT["train.max_steps"])


def wait_for_rank(job: Job, rank: int, timeout: float = 240) -> tuple[int, int, str, int]:
    job.wait_for(f"rank {rank}'s start line", lambda: rank in rank_lines(job), timeout=timeout)
    return rank_lines(job)[rank]


@pytest.mark.slurm
def test_a_lost_node_ends_the_job_fast_and_a_resubmission_resumes(
    slurm, tiny_shards, tmp_path, record_property
):
    run_dir = tmp_path / "run"
    long = {**PREEMPT, "train.max_steps": 100000}
    job = sbatch_train(tmp_path, tiny_overrides(tiny_shards, run_dir, **long), *TWO_NODES, procs=1)
    _, pid, node, _ = wait_for_rank(job, 1)
    assert node == "vaejob-n2"
    job.wait_for("the first checkpoint", (run_dir / "checkpoints" / FIRST_CKPT).is_dir, timeout=240)
    os.kill(pid, signal.SIGKILL)  # the training process on the second node
    killed = time.monotonic()
    assert job.wait_done(timeout=300) in ("FAILED", "CANCELLED"), job.describe()
    took = time.monotonic() - killed
    record_property("node_loss_to_job_end_s", round(took, 1))
    print(f"node loss: job ended {took:.1f} s after the rank on vaejob-n2 was killed")
    assert took < 120, job.describe()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "lost contact with another rank" in status["reason"], status
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    again = sbatch_train(
        tmp_path,
        tiny_overrides(tiny_shards, run_dir, **{**PREEMPT, "train.max_steps": 60}),
        *TWO_NODES,
        procs=1,
    )
    assert again.wait_done(timeout=300) == "COMPLETED", again.describe()
    assert f"resumed from {last} at step" in job_log(again), again.describe()


@pytest.mark.slurm
def test_a_hung_rank_fails_the_job_within_the_collective_timeout(
    slurm, tiny_shards, tmp_path, record_property
):
    run_dir = tmp_path / "run"
    long = {**PREEMPT, "train.max_steps": 100000, "run.collective_timeout_s": 20}
    job = sbatch_train(tmp_path, tiny_overrides(tiny_shards, run_dir, **long), *TWO_NODES, procs=1)
    _, pid, _, _ = wait_for_rank(job, 1)
    job.wait_for("the first checkpoint", (run_dir / "checkpoints" / FIRST_CKPT).is_dir, timeout=240)
    os.kill(pid, signal.SIGSTOP)  # hung: alive, holding its sockets, answering nothing
    stopped = time.monotonic()
    try:
        assert job.wait_done(timeout=300) in ("FAILED", "CANCELLED"), job.describe()
    finally:
        subprocess.run(["kill", "-CONT", str(pid)], capture_output=True)
    took = time.monotonic() - stopped
    record_property("hung_rank_to_job_end_s", round(took, 1))
    print(f"hung rank: job ended {took:.1f} s after the rank on vaejob-n2 was stopped (timeout 20 s)")
    assert took < 20 + 60 + 60, job.describe()  # the timeout, srun --wait=60, slack for a loaded machine
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "lost contact with another rank" in status["reason"], status
    assert "Timed out" in status["reason"] or "timed out" in status["reason"], status


@pytest.mark.slurm
def test_sigterm_waits_for_a_slow_checkpoint(slurm, tiny_shards, tmp_path):
    """torch's elastic agent SIGKILLs the ranks 30 s after it forwards a SIGTERM: a checkpoint that takes
    longer (here 40 s, a test-only delay before the rename) must still complete."""
    run_dir = tmp_path / "run"
    long = {**PREEMPT, "train.max_steps": 100000, "train.checkpoint_every": 1000000}
    job = sbatch_train(
        tmp_path, tiny_overrides(tiny_shards, run_dir, **long), env={"VAEJOB_TEST_CHECKPOINT_DELAY_S": "40"}
    )
    job.wait_for(
        "training",
        lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir, "train")) > 5,
        timeout=240,
    )
    # SIGTERM to every process of the job step (what Slurm's preemption and `scancel` send the steps):
    # accelerate's launcher gets it too.
    assert sh(["scancel", "--signal=TERM", job.id]).returncode == 0
    job.wait_done(timeout=300)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted", (status, job.describe())
    ckpt = run_dir / "checkpoints" / f"step_{status['step']:08d}"
    assert ckpt.is_dir() and verify(str(ckpt)) is None, job.describe()
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), job.describe()
