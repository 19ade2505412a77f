"""Submit vaejob training with submitit: Slurm, or this machine (``--cluster local``/``debug``).

    python launch/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 \\
        --config configs/fashion_mnist.yaml run.dir=runs/fmnist train.max_steps=20000
    python launch/submit.py --cluster local --gpus-per-node 0 --tasks-per-node 2 --config ... run.dir=...

Each submitit task is one training process: it exports the torch.distributed variables and calls
``vaejob.train.main`` in-process (no second training code path). Timeouts and preemption: Slurm sends
SIGUSR2 ``--signal`` seconds before the limit (submitit's ``job._interrupt()`` sends SIGTERM then SIGUSR2).
The Trainer turns SIGUSR2 into the training's own stop request, so training finishes its step, writes a
checkpoint and returns 75; then submitit's handler calls ``Trainer.checkpoint()`` and requeues the job,
which reruns with ``run.resume=auto`` in the same run dir (same W&B run). A SIGTERM alone (``scancel``)
stops training too, but only SIGUSR2 requeues: a cancelled job stays cancelled.
Slurm and local jobs print their id and logs and return; ``--wait`` (always for local/debug) waits for
the result and exits non-zero if the job failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from typing import Any

import submitit

# After a stop on SIGTERM, how long to wait for the SIGUSR2 that asks for a requeue (submitit's
# _interrupt() and Slurm's PreemptParameters=send_user_signal send it right after SIGTERM).
REQUEUE_SIGNAL_WAIT_S = 60.0
CRASH_WAIT_S = 10.0  # the same wait when training died instead of returning 75


class Trainer:
    """One submitit task = one training rank. Picklable: ``checkpoint()`` resubmits a fresh copy."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # Keep every GPU visible: accelerate selects cuda:LOCAL_RANK itself.
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        cpus = (
            int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
            or (os.cpu_count() or 1) // dist_env.local_world_size
        )
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus)))
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        import torch  # after OMP_NUM_THREADS

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "1"  # multi-process CPU (gloo) rather than N lone processes
        from vaejob import train

        print(
            f"[submit.py] {env}: rank {dist_env.rank}/{dist_env.world_size} "
            f"master {dist_env.master_addr}:{dist_env.master_port}",
            flush=True,
        )
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's handler: checkpoint() + scontrol requeue
        state = {"asked": False, "done": False}

        def on_usr2(signum: int, frame: Any) -> None:
            state["asked"] = True
            stop = signal.getsignal(signal.SIGUSR1)  # the training's own handler while it is in its loop
            if callable(stop):  # stop after this step, at a checkpoint
                stop(signal.SIGUSR1, frame)
            elif not state["done"] and callable(requeue):  # not training yet: nothing newer to save
                requeue(signum, frame)

        def requeue_asked(wait_s: float) -> bool:
            deadline = time.monotonic() + wait_s
            while not state["asked"] and time.monotonic() < deadline:
                time.sleep(0.2)
            return state["asked"] and callable(requeue)

        signal.signal(signal.SIGUSR2, on_usr2)
        try:
            try:
                code = train.main(self.argv)
            except Exception:
                # torch's loader SIGCHLD handler raises anew for every worker that dies: silence it first.
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                state["done"] = True
                # Slurm's SIGTERM reaches every process of the step, the loader workers and the W&B service
                # included, so training can crash instead of stopping cleanly. If a requeue was asked for,
                # the newest checkpoint is still good: resume from it.
                if not requeue_asked(CRASH_WAIT_S):
                    raise
                traceback.print_exc()
                print(
                    "[submit.py] training died after a requeue request: requeueing",
                    file=sys.stderr,
                    flush=True,
                )
                code = train.EXIT_PREEMPTED
            state["done"] = True
            if code == train.EXIT_PREEMPTED:
                if not requeue_asked(REQUEUE_SIGNAL_WAIT_S):
                    raise RuntimeError(
                        "training stopped at a checkpoint on SIGTERM/SIGUSR1 (exit 75) and nobody asked for a "
                        "requeue: submit again with the same run.dir to continue"
                    )
                requeue(signal.SIGUSR2, None)  # rank 0: checkpoint(), requeue, exit; other ranks: returns
            elif code != train.EXIT_OK:
                raise RuntimeError(
                    f"vaejob.train exited with {code} (2: bad config or data, 3: non-finite loss); "
                    "see this task's stderr log"
                )
            return {"rank": dist_env.rank, "exit_code": code}
        finally:
            signal.signal(signal.SIGUSR2, requeue)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # Training has already written its checkpoint; run.resume=auto picks it up in the same run.dir.
        return submitit.helpers.DelayedSubmission(Trainer(self.argv))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/submit.py",
        description="Submit vaejob training with submitit (Slurm, local processes, or in-process debug).",
        epilog="Everything after the flags is passed to vaejob.train; run.dir is made absolute and "
        "run.resume=auto is added so requeued jobs continue the same run.",
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
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vaejob.config import ConfigError, load_config

    try:  # fail here, not in a queued job
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    run_dir = os.path.abspath(cfg.run.dir)
    train_argv = ["--config", os.path.abspath(args.config)] if args.config else []
    kept = [o for o in args.overrides if not o.startswith(("run.dir=", "run.resume="))]
    train_argv += [*kept, f"run.dir={run_dir}", "run.resume=auto"]

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
