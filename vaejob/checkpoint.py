"""Checkpoints: ``RUN_DIR/checkpoints/step_XXXXXXXX/`` = accelerate ``save_state`` + ``trainer_state.json``.

Written to a hidden temp dir by every rank (accelerate saves per-rank RNG states), then renamed by rank 0, so
a crash mid-write leaves the previous checkpoint as the newest complete one. Loading never unpickles
arbitrary objects: weights are safetensors and accelerate loads the rest with ``torch.load(weights_only=True)``.
``Checkpointer`` owns the training's checkpoint cadence; ``load_model`` reads only the weights (evaluation
and sampling: no optimizer, no RNG states).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, NamedTuple

from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file

from vaejob import storage
from vaejob.cli import UserError
from vaejob.config import Config, ConfigError, load_config
from vaejob.model import VAE, build_model
from vaejob.rundir import STATE_FILE, RunDir, step_dir_name
from vaejob.shards import DataError, open_shards

WEIGHTS_FILE = "model.safetensors"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, should a saved key carry one


class CheckpointError(UserError):
    """A run dir or checkpoint that cannot be loaded; the message is one line naming it and the fix."""


def read_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


class Checkpointer:
    """Saves at ``every`` steps (and on request), keeps the newest ``keep``, restores the one to resume."""

    def __init__(self, acc: Accelerator, run: RunDir, every: int, keep: int) -> None:
        self.acc, self.run, self.every, self.keep = acc, run, every, keep

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: dict[str, Any]) -> str:
        """Collective: every rank must call it at the same step."""
        acc, run = self.acc, self.run
        final = run.checkpoint(step)
        tmp = os.path.join(run.checkpoints, f".tmp-{step_dir_name(step)}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp, safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            storage.atomic_write_json(os.path.join(tmp, STATE_FILE), {**state, "step": step})
            if os.path.exists(final):  # re-saving a step after a resume: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            storage.fsync_dir(run.checkpoints)
            for old in run.list_checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def restore(self, resume: str) -> tuple[str, dict[str, Any]] | None:
        """Load the checkpoint ``run.resume`` names into the prepared model, optimizer and RNGs; returns its
        path and trainer state, or None for a fresh start."""
        path = self.run.resume_from(resume)
        if path is None:
            return None
        self.acc.load_state(path)
        return path, read_state(path)


class LoadedRun(NamedTuple):
    model: VAE  # in eval mode, on the CPU
    cfg: Config  # run.dir set to the run dir given, so a moved run dir still works
    step: int
    checkpoint: str


def load_model(
    run_dir: str, checkpoint: str | None = None, image_shape: tuple[int, int, int] | None = None
) -> LoadedRun:
    """The model of a run (``checkpoint`` or its newest complete one), its config, step and checkpoint dir.

    ``image_shape`` defaults to the run's training shard set (only its manifest and shard heads are read).
    Raises ``CheckpointError`` for a missing run dir or checkpoint, an unreadable config, or weights that do
    not fit the config and image shape.
    """
    run = RunDir(run_dir)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run dir {run_dir} not found; pass the run.dir of a training run")
    if not os.path.isfile(run.config):
        raise CheckpointError(
            f"{run_dir} is not a vaejob run dir (no config.yaml); pass the run.dir of a training run"
        )
    try:
        cfg = load_config(run.config)
    except ConfigError as e:
        raise CheckpointError(f"{run.config}: {e}") from None
    cfg.run.dir = run_dir
    path = checkpoint or run.latest_checkpoint()
    if path is None:
        raise CheckpointError(
            f"no complete checkpoint in {run.checkpoints}; train longer or pass --checkpoint"
        )
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(os.path.join(path, STATE_FILE)) or not os.path.isfile(weights):
        raise CheckpointError(
            f"{path} is not a complete vaejob checkpoint (needs {STATE_FILE} and {WEIGHTS_FILE})"
        )
    if image_shape is None:
        try:
            image_shape = open_shards(cfg.data.shards).image_shape
        except DataError as e:
            raise CheckpointError(f"cannot read the run's image shape from data.shards: {e}") from None
    try:
        model = build_model(cfg.model, image_shape)
        state = {_strip_wrappers(k): v for k, v in load_file(weights).items()}
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, SafetensorError, OSError) as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{weights} does not fit {run.config} and images {image_shape} ({detail}); "
            "pass the run dir the checkpoint came from"
        ) from None
    return LoadedRun(model.eval(), cfg, int(read_state(path)["step"]), path)


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key
