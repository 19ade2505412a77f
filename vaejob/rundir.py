"""A run directory: where every file of a training run lives, its small state files, and which checkpoint a
job resumes from.

    RUN_DIR/config.yaml  metrics.jsonl  status.json  wandb_id.txt  lease.json
            checkpoints/step_XXXXXXXX/   samples/step_XXXXXXXX/   plots/   eval/   wandb/

A checkpoint directory is complete once renamed into place with its ``trainer_state.json``
(``vaejob.checkpoint`` writes it); ``checkpoints/corrupt/`` and ``checkpoints/abandoned/`` (damaged ones, a
rollback's abandoned future) are never resumed or pruned; ``status.json`` says running | completed | preempted |
failed.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

from vaejob import storage
from vaejob.config import ConfigError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _in_run(name: str) -> property:
    return property(lambda self: os.path.join(self.path, name), doc=f"RUN_DIR/{name}")


@dataclass(frozen=True)
class RunDir:
    path: str

    config = _in_run("config.yaml")  # the resolved config (no secrets)
    metrics = _in_run("metrics.jsonl")  # one JSON record per event: the source of truth
    status = _in_run("status.json")
    wandb_id = _in_run("wandb_id.txt")  # the job's one W&B run id
    checkpoints = _in_run("checkpoints")
    eval = _in_run("eval")  # vaejob.evaluate's JSON and figures
    lease = _in_run("lease.json")  # which job writes this run dir (vaejob.lease)

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints, step_dir_name(step))

    def list_checkpoints(self) -> list[str]:
        """Complete checkpoints (renamed into place, with a state file), oldest first."""
        if not os.path.isdir(self.checkpoints):
            return []
        found = []
        for name in os.listdir(self.checkpoints):
            m = _STEP_DIR.match(name)
            if m and os.path.exists(os.path.join(self.checkpoints, name, STATE_FILE)):
                found.append((int(m.group(1)), os.path.join(self.checkpoints, name)))
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self) -> str | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def resume_candidates(self, resume: str) -> list[str]:
        """The checkpoints ``run.resume`` (auto | never | PATH) lets a job resume from, the one to try first
        first: auto = every complete one, newest first; never = none (refused if there are some); PATH = it."""
        if resume == "never":
            if self.latest_checkpoint():
                raise ConfigError(
                    f"run.resume=never but {self.path} already holds checkpoints; "
                    "use run.resume=auto to continue it or pick a new run.dir"
                )
            return []
        if resume == "auto":
            return self.list_checkpoints()[::-1]
        if not os.path.isfile(os.path.join(resume, STATE_FILE)):
            raise ConfigError(
                f"run.resume={resume!r} is not a complete checkpoint dir; use auto, never or a step_XXXXXXXX dir"
            )
        return [resume]

    def write_status(self, state: str, step: int, max_steps: int, run_id: str, reason: str = "") -> None:
        """running | completed | preempted | failed, where the job stands and (when it ended badly) why."""
        status = {"state": state, "step": step, "max_steps": max_steps, "run_id": run_id, "time": time.time()}
        storage.atomic_write_json(self.status, {**status, **({"reason": reason} if reason else {})})

    def read_status(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.status)
        except (OSError, ValueError):
            return None
