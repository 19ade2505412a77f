"""Run tracking on rank 0: ``metrics.jsonl`` (the source of truth) mirrored to Weights & Biases.

One W&B run per job: its id is kept in ``run.dir/wandb_id.txt`` and in every checkpoint, so a resumed or
requeued job logs into the same run (``resume="allow"``). W&B's own step counter only ever grows; charts use
``trainer/step`` as their x-axis, so steps replayed after a resume never trip W&B's monotonic-step check.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
from collections.abc import Callable
from typing import Any

import numpy as np

from vaejob import storage
from vaejob.config import Config

log = logging.getLogger("vaejob")


def new_run_id() -> str:
    """8 characters of [a-z0-9], the shape of W&B's own run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: everything before it is good
    return records


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop events logged after the checkpoint we resume from, so steps never repeat in metrics.jsonl."""
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    if len(kept) != len(records) or os.path.exists(path):
        storage.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class Tracker:
    """Rank-0 logger; on other ranks every method is a no-op."""

    def __init__(
        self, cfg: Config, run_id: str, enabled: bool, resume_step: int | None, write_metrics: bool = True
    ):
        """``write_metrics=False`` attaches to the run's W&B run only (evaluation leaves metrics.jsonl alone)."""
        self.enabled = enabled
        self.run_id = run_id
        self.path = os.path.join(cfg.run.dir, "metrics.jsonl")
        self.wandb = None
        self._file = None
        if not enabled:
            return
        if write_metrics:
            if resume_step is not None:
                truncate_metrics(self.path, resume_step)
            elif os.path.exists(self.path):
                os.remove(self.path)  # a fresh run in a reused dir starts a fresh log
            self._file = open(self.path, "a", buffering=1)
        if cfg.wandb.mode != "disabled":
            self.wandb = self._init_wandb(cfg, run_id)

    def _init_wandb(self, cfg: Config, run_id: str):
        import wandb

        w = cfg.wandb
        if w.mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            raise RuntimeError(
                "wandb.mode=online but no W&B API key: run `wandb login`, set WANDB_API_KEY, "
                "or use wandb.mode=offline and `wandb sync` later"
            )
        run = wandb.init(
            project=w.project,
            entity=w.entity or None,
            group=w.group or None,
            job_type=w.job_type or None,
            name=w.name or None,
            tags=w.tags or None,
            id=run_id,
            resume="allow",
            dir=cfg.run.dir,
            mode=w.mode,
            config=cfg.to_dict(),  # the typed config holds no secrets: keys only come from the environment
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        run.define_metric("trainer/step")
        run.define_metric("*", step_metric="trainer/step")
        return run

    def _wandb_call(self, fn: Callable[[], Any]) -> None:
        """W&B is a mirror: if its service dies (Slurm's SIGTERM reaches every process of a step, W&B's too),
        warn once and go on; metrics.jsonl keeps everything and the next (requeued) job reattaches."""
        if self.wandb is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any W&B failure must not cost the training run
            log.warning("W&B stopped working (%s: %s); metrics.jsonl continues", type(e).__name__, e)
            self.wandb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        split = record.get("split", "train")
        payload = {f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")}
        payload["trainer/step"] = record["step"]
        self._wandb_call(lambda: self.wandb.log(payload))

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        if self.wandb is None:
            return
        import wandb

        payload: dict[str, Any] = {f"images/{k}": wandb.Image(v) for k, v in images.items()}
        payload["trainer/step"] = step
        self._wandb_call(lambda: self.wandb.log(payload))

    def summary(self, values: dict[str, Any]) -> None:
        self._wandb_call(lambda: self.wandb.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self._wandb_call(lambda: self.wandb.finish(exit_code=exit_code))
        self.wandb = None


def _has_netrc_key() -> bool:
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()
