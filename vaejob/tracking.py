"""Run tracking on rank 0: ``metrics.jsonl`` (the source of truth) mirrored to Weights & Biases, and the
training's log window (sums over ``train.log_every`` steps, reduced across ranks) with its progress bar.

One W&B run per job: its id is kept in ``run.dir/wandb_id.txt`` and in every checkpoint, so a resumed or
requeued job logs into the same run (``resume="allow"``). W&B's own step counter only ever grows; charts use
``trainer/step`` as their x-axis, so steps replayed after a resume never trip W&B's monotonic-step check.
W&B keeps every row each job logged (a crash-resume logs the steps after its checkpoint again, and the rows
the dead job never got written, see ``Tracker.relog_after``): for each ``trainer/step`` the row logged last
is the one metrics.jsonl holds.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from vaejob import storage
from vaejob.cli import LOG_NAME
from vaejob.config import Config, ConfigError
from vaejob.ranks import CpuGroup
from vaejob.rundir import RunDir

log = logging.getLogger(LOG_NAME)


def new_run_id() -> str:
    """8 characters of [a-z0-9], the shape of W&B's own run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def resolve_run_id(run: RunDir, from_checkpoint: str, resumed: bool) -> str:
    """The job's one W&B run id: the resumed checkpoint's, else (resuming a checkpoint written before the id
    was stored in it) ``wandb_id.txt``'s, else a new one."""
    if from_checkpoint:
        return from_checkpoint
    if resumed and os.path.exists(run.wandb_id):
        return open(run.wandb_id).read().strip() or new_run_id()
    return new_run_id()


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


def truncate_metrics(path: str, last_step: int, dropped_to: str | None = None) -> int:
    """Drop events logged after the checkpoint we resume from, so steps never repeat in metrics.jsonl
    (``dropped_to``: write them there first, for a rollback's abandoned future). Returns the last step the
    file still holds (0 if none)."""
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    if dropped_to is not None and len(kept) != len(records):
        dropped = [r for r in records if r.get("step", 0) > last_step]
        storage.atomic_write_text(dropped_to, "".join(json.dumps(r) + "\n" for r in dropped))
    if len(kept) != len(records) or os.path.exists(path):
        storage.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return max((r.get("step", 0) for r in kept), default=0)


class WandbKeyMissing(ConfigError):
    """``wandb.mode=online`` without an API key. ``require_wandb_key`` raises it on every rank at once, so the
    ranks may end together."""


def missing_wandb_key(cfg: Config) -> str | None:
    """Why W&B cannot log online from this process (the one line for the user), or None when it can."""
    if cfg.wandb.mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
        return (
            "wandb.mode=online but no W&B API key: run `wandb login`, set WANDB_API_KEY, "
            "or use wandb.mode=offline and `wandb sync` later"
        )
    return None


def require_wandb_key(cfg: Config, ranks: CpuGroup, main: bool) -> None:
    """Collective: rank 0 (the one that logs to W&B, so its environment is the one that counts) checks for an
    API key, and every rank raises ``WandbKeyMissing`` when there is none: none is left waiting for the others."""
    problem = ranks.broadcast(missing_wandb_key(cfg) if main else None)
    if problem:
        raise WandbKeyMissing(problem)


class Tracker:
    """Rank-0 logger; on other ranks every method is a no-op."""

    def __init__(
        self, cfg: Config, run_id: str, enabled: bool, resume_step: int | None, write_metrics: bool = True
    ):
        """``write_metrics=False`` attaches to the run's W&B run only (evaluation leaves metrics.jsonl alone)."""
        self.enabled = enabled
        self.run_id = run_id
        self.path = RunDir(cfg.run.dir).metrics
        self.wandb = None
        self._file = None
        if not enabled:
            return
        if write_metrics:
            if resume_step is not None:
                last = truncate_metrics(self.path, resume_step)
                if last <= resume_step - cfg.train.log_every:  # a log step is missing: say so, once
                    log.warning(
                        f"{self.path} ends at step {last} but this job resumes at step {resume_step}: the steps "
                        "between have no records (a checkpoint newer than the metrics was resumed)"
                    )
            elif os.path.exists(self.path):
                os.remove(self.path)  # a fresh run in a reused dir starts a fresh log
            self._file = open(self.path, "a", buffering=1)
        if cfg.wandb.mode != "disabled":
            self.wandb = self._init_wandb(cfg, run_id)

    def _init_wandb(self, cfg: Config, run_id: str):
        import wandb

        w = cfg.wandb
        problem = missing_wandb_key(cfg)  # callers check it first, on every rank: require_wandb_key
        if problem:
            raise WandbKeyMissing(problem)
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
        self._mirror(record)

    def _mirror(self, record: dict[str, Any]) -> None:
        split = record.get("split", "train")
        payload = {f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")}
        payload["trainer/step"] = record["step"]
        self._wandb_call(lambda: self.wandb.log(payload))

    def relog_after(self, step: int) -> int:
        """Log metrics.jsonl's records after ``step`` (it is already cut at the resumed checkpoint) to W&B
        again; returns how many. For a job that died without a word (SIGKILL, a lost node): W&B never wrote
        the rows it still buffered (offline: the last, partial 32 KiB block of its log)."""
        if self.wandb is None:
            return 0
        records = [r for r in read_metrics(self.path) if r.get("step", 0) > step]
        for record in records:
            self._mirror(record)
        return len(records)

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        if self.wandb is None:
            return
        import wandb

        payload: dict[str, Any] = {f"images/{k}": wandb.Image(v) for k, v in images.items()}
        payload["trainer/step"] = step
        self._wandb_call(lambda: self.wandb.log(payload))

    def log_eval(self, record: dict[str, Any], images: dict[str, np.ndarray]) -> None:
        """An evaluation's numbers under ``eval/<split>/...`` and its figures, at the checkpoint's step."""
        if self.wandb is None:
            return
        prefix = f"eval/{record['split']}"
        payload: dict[str, Any] = {
            f"{prefix}/{key}": value
            for key, value in record.items()
            if isinstance(value, int | float) and key not in ("step", "seed")
        }
        for name, stats in record.get("per_class", {}).items():
            payload[f"{prefix}/nelbo/{name}"] = stats["nelbo"]
        payload["trainer/step"] = record["step"]
        self._wandb_call(lambda: self.wandb.log(payload))
        self.log_images(record["step"], {f"eval_{record['split']}_{k}": v for k, v in images.items()})

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


def attach(cfg: Config, main: bool) -> Tracker:
    """The run's W&B run (its id from ``wandb_id.txt``, the config's mode) on rank 0, for a command that
    reports into a finished run (``vaejob.evaluate``); metrics.jsonl is left alone."""
    run = RunDir(cfg.run.dir)
    run_id = resolve_run_id(run, "", resumed=True)
    return Tracker(cfg, run_id, enabled=main, resume_step=None, write_metrics=False)


class TrainLog:
    """The training's log window: loss / recon / KL summed on the device over ``log_every`` steps (no host
    sync per step), reduced across ranks when a record is written, plus rank 0's progress bar."""

    def __init__(self, acc: Accelerator, tracker: Tracker, cfg: Config, step: int) -> None:
        self.acc, self.tracker, self.every = acc, tracker, cfg.train.log_every
        self.window = torch.zeros(3, device=acc.device)
        self.steps = 0
        self.images, self.started = 0, time.perf_counter()
        self.postfix: dict[str, str] = {}
        self.bar: Any = None
        if acc.is_main_process and cfg.train.progress:
            from tqdm import tqdm

            total = cfg.train.max_steps
            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def due(self, step: int) -> bool:
        """Whether the step that ends at ``step`` (1-based) closes a window."""
        return step % self.every == 0

    def add(
        self, loss: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, images: int, applied: bool = True
    ) -> None:
        """One step's numbers; a dropped update's (a NaN loss in skip mode) stay out of the averages, its images
        count for the throughput."""
        if applied:
            self.window += torch.stack([loss.detach(), recon.detach().mean(), kl.detach().mean()])
            self.steps += 1
        self.images += images
        if self.bar is not None:
            self.bar.update(1)

    def write(
        self, step: int, *, lr: float, beta: float, grad_norm: float | None, epoch: int, skipped_steps: int
    ) -> dict[str, Any] | None:
        """Collective: reduce the window, log one train record, start a new window. A window whose every update
        was dropped has nothing to average: no record, and the next one covers its time (every rank has the
        same count: the skip decisions are rank-identical)."""
        if self.steps == 0:
            return None
        sums = self.acc.reduce(self.window, reduction="mean").tolist()
        n = self.steps
        record = {
            "step": step,
            "split": "train",
            "loss": sums[0] / n,
            "recon": sums[1] / n,
            "kl": sums[2] / n,
            "lr": lr,
            "beta": beta,
            "grad_norm": grad_norm,
            "images_per_s": self.images / (time.perf_counter() - self.started),
            "epoch": epoch,
            "time": time.time(),  # wall clock: time to quality from the job's launch
        }
        if skipped_steps:
            record["skipped_steps"] = skipped_steps
        self.tracker.log(record)
        self.show(loss=f"{record['loss']:.2f}", img_s=f"{record['images_per_s']:.0f}")
        self.window.zero_()
        self.steps = 0
        self.images, self.started = 0, time.perf_counter()
        return record

    def epoch_skips(self, step: int, epoch: int, skipped: int) -> None:
        """Collective, at the step that ends an epoch (every rank ends it at the same step): an indexed
        set's undecodable samples of the epoch, all ranks, as one ``data`` record, when there were any."""
        total = int(self.acc.reduce(torch.tensor(skipped, device=self.acc.device), reduction="sum"))
        if total:
            self.tracker.log({"step": step, "split": "data", "epoch": epoch, "skipped_samples": total})
            if self.acc.is_main_process:
                log.warning(
                    "epoch %d: %d sample(s) skipped (undecodable images); see the warnings above",
                    epoch,
                    total,
                )

    def show(self, **postfix: str) -> None:
        """Values shown beside rank 0's progress bar (the latest train and val numbers)."""
        if self.bar is not None:
            self.postfix.update(postfix)
            self.bar.set_postfix(self.postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def state_dict(self) -> dict[str, Any]:
        """Collective (reduces the open window, so a resumed run logs the same averages)."""
        return {
            "log_window": self.acc.reduce(self.window, reduction="mean").tolist(),
            "log_window_steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = torch.tensor(state["log_window"], device=self.acc.device)
        self.steps = state["log_window_steps"]


def _has_netrc_key() -> bool:
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()
