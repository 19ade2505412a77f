"""Checkpoints: ``run.dir/checkpoints/step_XXXXXXXX/`` = accelerate ``save_state`` + ``trainer_state.json``.

Written to a hidden temp dir by every rank (accelerate saves per-rank RNG states), then renamed by rank 0, so
a crash mid-write leaves the previous checkpoint as the newest complete one. Loading never unpickles
arbitrary objects: weights are safetensors and accelerate loads the rest with ``torch.load(weights_only=True)``.
``load_model`` reads only the weights (for evaluation and sampling: no optimizer, no RNG states).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file

from vaejob import storage
from vaejob.config import Config, ConfigError, load_config
from vaejob.model import VAE, build_model

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, should a saved key carry one
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(run_dir), f"step_{step:08d}")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints (renamed into place, with a state file), oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def save(accelerator: Accelerator, run_dir: str, step: int, state: dict[str, Any], keep: int) -> str:
    """Collective: every rank must call it at the same step."""
    final = step_dir(run_dir, step)
    tmp = os.path.join(checkpoint_root(run_dir), f".tmp-step_{step:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        storage.atomic_write_json(os.path.join(tmp, STATE_FILE), {**state, "step": step})
        if os.path.exists(final):  # re-saving a step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        storage.fsync_dir(checkpoint_root(run_dir))
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: str) -> dict[str, Any]:
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f"{path} is not a complete vaejob checkpoint (no {STATE_FILE})")
    accelerator.load_state(path)
    return read_state(path)


class CheckpointError(Exception):
    """A run dir or checkpoint that cannot be loaded; the message is one line naming it and the fix."""


def load_model(
    run_dir: str, checkpoint: str | None = None, image_shape: tuple[int, int, int] | None = None
) -> tuple[VAE, Config, int]:
    """The model of a run (``checkpoint`` or its newest complete one) in eval mode on the CPU, its config
    (``run.dir`` set to ``run_dir``, so a moved run dir still works) and the checkpoint's step.

    ``image_shape`` defaults to the run's training shard set (only its manifest and shard heads are read).
    Raises ``CheckpointError`` for a missing run dir or checkpoint, an unreadable config, or weights that do
    not fit the config and image shape.
    """
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run dir {run_dir} not found; pass the run.dir of a training run")
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{run_dir} is not a vaejob run dir (no config.yaml); pass the run.dir of a training run"
        )
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    cfg.run.dir = run_dir
    path = checkpoint or latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(
            f"no complete checkpoint in {checkpoint_root(run_dir)}; train longer or pass --checkpoint"
        )
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(os.path.join(path, STATE_FILE)) or not os.path.isfile(weights):
        raise CheckpointError(
            f"{path} is not a complete vaejob checkpoint (needs {STATE_FILE} and {WEIGHTS_FILE})"
        )
    if image_shape is None:
        from vaejob.data import DataError, open_shards  # the data stack only when the shape must be looked up

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
            f"{weights} does not fit {config_path} and images {image_shape} ({detail}); "
            "pass the run dir the checkpoint came from"
        ) from None
    return model.eval(), cfg, int(read_state(path)["step"])


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key
