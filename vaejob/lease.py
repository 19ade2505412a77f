"""The run-dir lease: one live writer per run dir.

``RUN_DIR/lease.json`` names the job that writes the run dir: host, pid (of rank 0), Slurm job id, a token
and a heartbeat that rank 0 refreshes every ``timeout / 4`` seconds. A second job finds it and is refused
(one line, exit 2) while the holder is alive. A holder counts as gone, and its lease is taken over with a
line saying so, when: it is this machine's and its pid is dead; or Slurm says its job is no longer running;
or its heartbeat is older than ``timeout``. A requeued Slurm job (same job id) takes over its own lease at
once. The holder that finds its token replaced has lost the run dir and must stop writing at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from vaejob import storage
from vaejob.cli import LOG_NAME, JobFailure, UsageError, UserError, error_line
from vaejob.ranks import CpuGroup

LEASE_FORMAT = "vaejob-lease/1"
log = logging.getLogger(LOG_NAME)
SLURM_LIVE = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "RESIZING",
    "STOPPED",
}


class RunDirBusy(UsageError):
    """Another live job holds the run dir."""


class RunDirLost(JobFailure):
    """Another job took over this run dir's lease while this one was running."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def _slurm_state(job_id: str) -> str | None:
    """The job's state from Slurm, "" when Slurm no longer knows it, None when Slurm cannot be asked."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "" if "Invalid job id" in out.stderr else None
    return out.stdout.strip().split("\n")[0]


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    age = (now or time.time()) - float(holder.get("heartbeat", 0))
    job = f" (Slurm job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, heartbeat {age:.0f} s ago"


def holder_gone(holder: dict[str, Any], timeout_s: float, now: float | None = None) -> str | None:
    """Why the holder is gone (a line), or None while it looks alive."""
    now = now or time.time()
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
        return "its process is gone"
    job = holder.get("slurm_job_id")
    if job:
        state = _slurm_state(str(job))
        if state == "" or (state and state not in SLURM_LIVE):
            return f"Slurm job {job} is {state or 'gone'}"
    age = now - float(holder.get("heartbeat", 0))
    if age > timeout_s:
        return f"its heartbeat stopped (older than run.lease_timeout_s={timeout_s:g})"
    return None


def read_lease(path: str) -> dict[str, Any] | None:
    try:
        lease = storage.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or damaged: nobody can be shown to hold it
    return lease if isinstance(lease, dict) else {}


class Lease:
    """Rank 0's hold on a run dir: ``acquire``, keep it fresh (``start_heartbeat``), ``release``."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path, self.timeout_s = path, timeout_s
        self.me = {
            "format": LEASE_FORMAT,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
            "token": uuid.uuid4().hex,
            "acquired": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Hold the lease, or raise ``RunDirBusy``; returns a line when an earlier holder's lease was taken."""
        taken = None
        if not self._create():
            holder = read_lease(self.path) or {}
            mine = self.me["slurm_job_id"]
            if mine and holder.get("slurm_job_id") == mine:
                taken = f"requeued Slurm job {mine} takes over its own run-dir lease"
            else:
                why = holder_gone(holder, self.timeout_s) if holder else "its lease file is unreadable"
                if why is None:
                    raise RunDirBusy(
                        f"run dir {os.path.dirname(self.path)} is in use by {describe(holder)}; stop that job "
                        f"or pick another run.dir (a lease whose heartbeat is {self.timeout_s:g} s old is taken over)"
                    )
                taken = f"taking over the run-dir lease of {describe(holder)}: {why}"
            self._write()
        time.sleep(0.05)  # another job that took it at the same moment: the last rename wins
        if (read_lease(self.path) or {}).get("token") != self.me["token"]:
            raise RunDirBusy(
                f"run dir {os.path.dirname(self.path)} was taken by another job just now; pick another run.dir"
            )
        return taken

    def _create(self) -> bool:
        """Write the lease only if there is none (atomic: O_EXCL): two new jobs cannot both win."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "heartbeat": time.time()}, f, indent=2, sort_keys=True)
        return True

    def _write(self) -> None:
        storage.atomic_write_json(self.path, {**self.me, "heartbeat": time.time()})

    def start_heartbeat(self, on_lost: Callable[[str], None]) -> None:
        """Refresh the heartbeat every ``timeout / 4`` s; ``on_lost(reason)`` once another job holds it."""

        def beat() -> None:
            while not self._stop.wait(self.timeout_s / 4):
                holder = read_lease(self.path)
                if holder is not None and holder.get("token") not in (None, self.me["token"]):
                    on_lost(f"the run-dir lease was taken over by {describe(holder)}")
                    return
                try:
                    self._write()
                except OSError:
                    pass  # a full disk: the next beat tries again; a stale lease is only taken after timeout

        self._thread = threading.Thread(target=beat, daemon=True, name="lease-heartbeat")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (read_lease(self.path) or {}).get("token") == self.me["token"]:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def hold(lease: Lease | None, ranks: CpuGroup, on_lost: Callable[[str], None]) -> None:
    """Collective: rank 0 (the one with a ``lease``) takes it and keeps it fresh; if it cannot, every rank
    raises the same ``RunDirBusy``. ``on_lost(reason)`` runs if another job takes the lease later."""
    error, taken = None, None
    if lease is not None:
        try:
            taken = lease.acquire()
        except (UserError, OSError) as e:
            error = str(e) if isinstance(e, UserError) else error_line(e)
    error = ranks.first_error(error)
    if error is not None:
        raise RunDirBusy(error)
    if lease is not None:
        if taken:
            log.warning(taken)
        lease.start_heartbeat(on_lost)
