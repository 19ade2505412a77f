"""Checkpoints: ``run.dir/checkpoints/step_XXXXXXXX/`` = accelerate ``save_state`` + ``trainer_state.json``.

Written to a hidden temp dir by every rank (accelerate saves per-rank RNG states), then renamed by rank 0, so
a crash mid-write leaves the previous checkpoint as the newest complete one. Loading never unpickles
arbitrary objects: weights are safetensors and accelerate loads the rest with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from accelerate import Accelerator

from vaejob import storage

STATE_FILE = "trainer_state.json"
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
