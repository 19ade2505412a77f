"""Submit vaejob training with submitit: Slurm, or this machine (``--cluster local``/``debug``).

    python launch/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 \\
        --config configs/fashion_mnist.yaml run.dir=runs/fmnist train.max_steps=20000
    python launch/submit.py --cluster local --gpus-per-node 0 --tasks-per-node 2 --config ... run.dir=...

Each submitit task is one training process: it exports the torch.distributed variables and calls
``vaejob.train.main`` in-process (no second training code path; the training flags are the training
parser's own). Timeouts and preemption: Slurm sends SIGUSR2 ``--signal`` seconds before the limit
(submitit's ``job._interrupt()`` sends SIGTERM then SIGUSR2). The task turns SIGUSR2 into the training's stop
request (``vaejob.preempt.request_stop``), so training finishes its step, writes a checkpoint and returns 75;
then submitit's handler calls ``Trainer.checkpoint()`` and requeues the job, which reruns with
``run.resume=auto`` in the same run dir (same W&B run). The first job keeps a ``run.resume`` you give (a
rollback to ``run.resume=PATH``); every requeue resumes ``auto``: ``checkpoint()``'s resubmission says so, and
a requeue Slurm does by itself (reusing the first job's pickle) is told apart by ``SLURM_RESTART_COUNT``.
A SIGTERM alone (``scancel``) stops training too,
but only SIGUSR2 requeues: a cancelled job stays cancelled. Slurm and local jobs print their id and logs
and return; ``--wait`` (always for local/debug) waits for the result and exits non-zero if the job failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from typing import Any

if __package__ in (None, ""):  # `python launch/submit.py` from anywhere: the repository's vaejob
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import submitit

from vaejob.cli import EXIT_OK, EXIT_PREEMPTED, UserError, report
from vaejob.config import load_config
from vaejob.rundir import RunDir
from vaejob.train import add_job_arguments

PROG = "launch/submit.py"
# After a stop on SIGTERM, how long to wait for the SIGUSR2 that asks for a requeue (submitit's
# _interrupt() and Slurm's PreemptParameters=send_user_signal send it right after SIGTERM).
REQUEUE_SIGNAL_WAIT_S = 60.0
CRASH_WAIT_S = 10.0  # the same wait when training died instead of returning 75


def export_distributed_env() -> tuple[Any, Any]:
    """torch.distributed variables and threads for this task, before torch is imported."""
    env = submitit.JobEnvironment()
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)  # accelerate picks cuda:LOCAL_RANK itself
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or (os.cpu_count() or 1) // dist_env.local_world_size
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus)))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    import torch

    if not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "1"  # multi-process CPU (gloo) rather than N lone processes
    return env, dist_env


class RequeueBridge:
    """SIGUSR2 (submitit's requeue signal) -> the training's stop request while training runs; remembers
    that a requeue was asked for, so the task can requeue once training has stopped at a checkpoint."""

    def __init__(self) -> None:
        self.requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + scontrol requeue
        self.asked = self.training_done = False

    def __enter__(self) -> RequeueBridge:
        signal.signal(signal.SIGUSR2, self._on_usr2)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGUSR2, self.requeue)

    def _on_usr2(self, signum: int, frame: Any) -> None:
        from vaejob.preempt import request_stop

        self.asked = True
        if not request_stop("SIGUSR2") and not self.training_done and callable(self.requeue):
            self.requeue(signum, frame)  # not training yet: nothing newer to save, requeue now

    def asked_within(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while not self.asked and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.asked and callable(self.requeue)

    def requeue_now(self) -> None:
        self.requeue(signal.SIGUSR2, None)  # rank 0: checkpoint(), requeue, exit; other ranks: returns


def requeue_argv(argv: list[str]) -> list[str]:
    """``argv`` for a requeued job: whatever the first job resumed, a requeue continues the run dir's newest
    checkpoint (the first job's own, after a rollback: ``vaejob.checkpoint`` moved the newer ones aside)."""
    return [a for a in argv if not a.startswith("run.resume=")] + ["run.resume=auto"]


class Trainer:
    """One submitit task = one training rank. Picklable: ``checkpoint()`` resubmits a fresh copy."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def argv_for_this_run(self) -> list[str]:
        """The first run's argv as submitted; a job Slurm requeued by itself (node failure,
        ``PreemptMode=REQUEUE``) reruns the first job's pickle, so it is told apart by ``SLURM_RESTART_COUNT``."""
        restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        return requeue_argv(self.argv) if restarted else self.argv

    def __call__(self) -> dict[str, Any]:
        env, dist_env = export_distributed_env()
        from vaejob import train

        print(
            f"[submit.py] {env}: rank {dist_env.rank}/{dist_env.world_size} "
            f"master {dist_env.master_addr}:{dist_env.master_port}",
            flush=True,
        )
        with RequeueBridge() as bridge:
            code = self._train(train.main, bridge)
            if code == EXIT_PREEMPTED:
                if not bridge.asked_within(REQUEUE_SIGNAL_WAIT_S):
                    raise RuntimeError(
                        "training stopped at a checkpoint on SIGTERM/SIGUSR1 (exit 75) and nobody asked for a "
                        "requeue: submit again with the same run.dir to continue"
                    )
                bridge.requeue_now()
            elif code != EXIT_OK:
                raise RuntimeError(
                    f"vaejob.train exited with {code} (2: bad config or data, 3: non-finite loss); "
                    "see this task's stderr log"
                )
        return {"rank": dist_env.rank, "exit_code": code}

    def _train(self, train_main: Any, bridge: RequeueBridge) -> int:
        try:
            code = train_main(self.argv_for_this_run())
        except Exception:
            bridge.training_done = True
            # torch's loader SIGCHLD handler raises anew for every worker that dies: silence it first.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # Slurm's SIGTERM reaches every process of the step, the loader workers and the W&B service
            # included, so training can crash instead of stopping cleanly. If a requeue was asked for,
            # the newest checkpoint is still good: resume from it.
            if not bridge.asked_within(CRASH_WAIT_S):
                raise
            traceback.print_exc()
            print(
                "[submit.py] training died after a requeue request: requeueing", file=sys.stderr, flush=True
            )
            return EXIT_PREEMPTED
        bridge.training_done = True
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # Training has already written its checkpoint; run.resume=auto picks it up in the same run.dir.
        return submitit.helpers.DelayedSubmission(Trainer(requeue_argv(self.argv)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Submit vaejob training with submitit (Slurm, local processes, or in-process debug).",
        epilog="Everything after the flags is passed to vaejob.train; run.dir (and a run.resume=PATH) is made "
        "absolute. The first job resumes as run.resume says (default auto); requeued jobs resume "
        "run.resume=auto, so they continue the same run.",
    )
    p.add_argument(
        "--cluster", choices=("slurm", "local", "debug"), help="default: slurm if srun exists, else local"
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, help="default: 8 on Slurm, this machine's GPU count locally")
    p.add_argument(
        "--tasks-per-node", type=int, help="training processes per node (default: GPUs per node, or 1)"
    )
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem-gb", type=float, help="memory per node (default: the partition's)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 1440)")
    p.add_argument(
        "--max-timeouts", type=int, default=100, help="requeues after time-limit stops (default 100)"
    )
    p.add_argument("--folder", help="submitit logs and pickles (default RUN_DIR/submitit)")
    p.add_argument("--job-name", default="vaejob")
    p.add_argument("--wait", action="store_true", help="Slurm: wait for the job and exit 1 if it fails")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted (the sbatch script)")
    add_job_arguments(p)  # --config FILE key=value ...: the training's own
    return p


def make_executor(args: argparse.Namespace, run_dir: str) -> tuple[submitit.AutoExecutor, str, int, int]:
    """The executor with its parameters; returns it with the cluster, GPUs and tasks per node."""
    cluster = args.cluster or submitit.AutoExecutor.which()
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = 8 if cluster == "slurm" else _local_gpus()
    tasks = 1 if cluster == "debug" else (args.tasks_per_node or max(gpus, 1))
    ex = submitit.AutoExecutor(
        folder=args.folder or os.path.join(run_dir, "submitit"),
        cluster=cluster,
        slurm_max_num_timeout=args.max_timeouts,
    )
    params: dict[str, Any] = dict(
        name=args.job_name,
        timeout_min=args.time,
        nodes=args.nodes,
        tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task,
        slurm_signal_delay_s=120,  # time to finish a step and write a checkpoint before the limit
        slurm_additional_parameters={"requeue": True},
    )
    if gpus > 0 or cluster == "local":
        params["gpus_per_node"] = gpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    ex.update_parameters(**params)
    return ex, cluster, gpus, tasks


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # fail here, not in a queued job
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        return report("submit.py", e)
    run_dir = os.path.abspath(cfg.run.dir)
    resume = cfg.run.resume if cfg.run.resume in ("auto", "never") else os.path.abspath(cfg.run.resume)
    try:  # a named checkpoint that is not one (or never with checkpoints there) fails here too
        RunDir(run_dir).resume_candidates(resume)
    except UserError as e:
        return report("submit.py", e)
    train_argv = ["--config", os.path.abspath(args.config)] if args.config else []
    kept = [o for o in args.overrides if not o.startswith(("run.dir=", "run.resume="))]
    train_argv += [*kept, f"run.dir={run_dir}", f"run.resume={resume}"]  # the first job's; requeues: auto
    ex, cluster, gpus, tasks = make_executor(args, run_dir)

    if args.dry_run:
        inner = ex._executor  # submitit has no public "render the script" call
        if cluster == "slurm":
            print(inner._make_submission_file_text(inner._submitit_command_str, "dry-run"), end="")
        else:
            print(f"# {cluster}: {tasks} process(es) of: {inner._submitit_command_str}")
        print(f"# each task calls vaejob.train.main({train_argv!r})")
        return 0

    job = ex.submit(Trainer(train_argv))
    print(f"submitted {cluster} job {job.job_id}: {args.nodes} node(s) x {tasks} task(s), {gpus} GPU(s)/node")
    print(f"  stdout:  {job.paths.stdout}")
    print(f"  stderr:  {job.paths.stderr}")
    print(f"  run dir: {run_dir}", flush=True)
    if cluster == "slurm" and not args.wait:
        return 0
    try:
        job.results()
    except Exception as e:  # submitit raises FailedJobError / UncompletedJobError with the task's traceback
        print(f"submit.py: job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed: {run_dir}")
    return 0


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())
