"""Where a run stands: ``python -m vaejob.status RUN_DIR [--json] [--wandb-sync]``.

``status.json`` says what the job last wrote (running | completed | preempted | failed, with a reason); the
run-dir lease says whether its writer is still alive, so a run whose job died without a word (SIGKILL, a lost
node) shows as ``dead`` rather than ``running``: status ``running`` and a lease holder that is gone (or no
lease at all). ``--wandb-sync`` prints the command that uploads every offline W&B segment of the run (one
per job segment: each requeue writes one) into its one W&B run, in order.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import sys
import time
from typing import Any

from vaejob.cli import ArgumentParser, UsageError, UserError, report
from vaejob.config import ConfigError, load_config
from vaejob.lease import describe, holder_gone, read_lease
from vaejob.rundir import RunDir

PROG = "vaejob.status"
_SEGMENT = re.compile(r"^offline-run-(\d{8}_\d{6})-([a-z0-9]+)$")


def run_status(run: RunDir, lease_timeout_s: float) -> dict[str, Any]:
    """status.json as written, with ``state`` = ``dead`` when it says running but its writer is gone."""
    status = run.read_status()
    if status is None:
        raise UsageError(f"{run.path} has no readable status.json: not a vaejob run dir, or it never started")
    out = dict(status)
    if status.get("state") == "running":
        holder = read_lease(run.lease)
        why = "it holds no lease" if not holder else holder_gone(holder, lease_timeout_s)
        if why is None:
            out["writer"] = describe(holder)
        else:
            out["state"] = "dead"
            out["reason"] = (
                f"status.json says running at step {status.get('step')} but its job is gone ({why})"
            )
    return out


def describe_status(s: dict[str, Any]) -> str:
    at = f"step {s.get('step')} of {s.get('max_steps')}"
    if s["state"] == "running":
        return f"running: {at}, written by {s.get('writer')}"
    if s["state"] in ("completed",):
        return f"completed: {at}"
    if s["state"] == "preempted":
        return f"preempted at {at} ({s.get('reason', 'a stop signal')}); resume with run.resume=auto"
    return f"{s['state']}: {at}: {s.get('reason', 'no reason recorded')}; resume with run.resume=auto"


def wandb_segments(run: RunDir, run_id: str) -> list[str]:
    """The run's offline W&B dirs of ``run_id``, oldest first (their names start with the start time)."""
    found = []
    for path in glob.glob(os.path.join(run.path, "wandb", "offline-run-*")):
        m = _SEGMENT.match(os.path.basename(path))
        if m and m.group(2) == run_id and not os.path.islink(path):
            found.append((m.group(1), path))
    return [path for _, path in sorted(found)]


def wandb_sync_command(segments: list[str]) -> str:
    """The shell command that uploads ``segments`` into one W&B run. wandb >= 0.28.1 (the version vaejob
    requires) groups the files it is given by run id and syncs one run's files one after another in start
    order, each appending to the run (`wandb sync --help`); older versions replaced the run's history with the
    later segment unless synced with --append (wandb issues #3841, #5865)."""
    return shlex.join(["wandb", "sync", *segments])


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG, description="Where a vaejob run stands (and how to upload its offline W&B run)."
    )
    p.add_argument("run", help="the run dir")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument(
        "--wandb-sync", action="store_true", help="print the command that syncs its offline W&B segments"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        run = RunDir(args.run)
        try:
            timeout = load_config(run.config).run.lease_timeout_s
        except ConfigError:
            timeout = 120.0
        status = run_status(run, timeout)
        if args.wandb_sync:
            segments = wandb_segments(run, str(status.get("run_id", "")))
            if not segments:
                raise UsageError(
                    f"{run.path} holds no offline W&B run {status.get('run_id')}: nothing to sync"
                )
            print(wandb_sync_command(segments))
        elif args.json:
            print(json.dumps({**status, "checked": time.time()}, indent=2, sort_keys=True))
        else:
            print(describe_status(status))
    except UserError as e:
        return report(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
