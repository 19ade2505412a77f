"""Checkpoints: ``RUN_DIR/checkpoints/step_XXXXXXXX/`` = accelerate ``save_state`` + ``trainer_state.json`` +
``checkpoint.json`` (the size and sha256 of every other file, written last, before the rename).

Written to a hidden temp dir by every rank (accelerate saves per-rank RNG states), then renamed by rank 0, so
a crash mid-write leaves the previous checkpoint as the newest complete one; a write that fails on any rank
(a full disk) fails on every rank, with one line, and leaves no temp dir. Loading never unpickles arbitrary
objects: weights are safetensors and accelerate loads the rest with ``torch.load(weights_only=True)``.

Resuming checks before it loads: the files against ``checkpoint.json``, the trainer state, the weights'
names and shapes against the model, and each rank's RNG file; after loading, that the RNG state really is the
saved one (accelerate only logs a failed RNG load, which would make a resume silently inexact). With
``run.resume=auto`` a damaged checkpoint is moved to ``checkpoints/corrupt/`` with one warning and the next
newer-to-older one is tried; a named checkpoint that fails, or weights that do not fit the config, stop the job
with one line (exit 2). ``load_model`` (evaluation, sampling) reads only verified weights.

A named checkpoint (``run.resume=PATH``) older than the run dir's newest is a rollback: once every rank has
loaded it, rank 0 moves the run dir's checkpoints from its step on to ``checkpoints/abandoned/`` (with their
metrics.jsonl records, one log line), so the launchers' ``run.resume=auto`` on the next requeue continues
the rollback's lineage instead of jumping to the abandoned future; pruning never sees the quarantine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vaejob import storage
from vaejob.cli import LOG_NAME, JobFailure, UserError, error_line
from vaejob.config import Config, ConfigError, load_config
from vaejob.device import resolve_auto
from vaejob.models import VAE, build_model
from vaejob.ranks import CpuGroup
from vaejob.rundir import STATE_FILE, RunDir, step_dir_name
from vaejob.shards import DataError, open_shards
from vaejob.tracking import truncate_metrics

WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # the averaged weights (vaejob.ema), when train.ema_decay > 0
MANIFEST_FILE = "checkpoint.json"
MANIFEST_FORMAT = "vaejob-checkpoint/1"
CORRUPT_DIR = "corrupt"
ABANDONED_DIR = "abandoned"  # checkpoints newer than the one a rollback resumed (see the module docstring)
RNG_FILE = "random_states_{}.pkl"  # accelerate's per-rank RNG states
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, should a saved key carry one
# Tests only: seconds rank 0 sleeps before renaming a checkpoint into place (a slow shared file system).
TEST_DELAY_ENV = "VAEJOB_TEST_CHECKPOINT_DELAY_S"

log = logging.getLogger(LOG_NAME)


class CheckpointError(UserError):
    """A run dir or checkpoint that cannot be loaded; the message is one line naming it and the fix."""


class CheckpointWriteError(JobFailure):
    """A checkpoint could not be written (a full disk, a vanished file system)."""


def read_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: str, step: int) -> None:
    """``checkpoint.json``: size and sha256 of every file in the checkpoint dir (about 1 s per GB)."""
    names = sorted(
        n for n in os.listdir(path) if n != MANIFEST_FILE and os.path.isfile(os.path.join(path, n))
    )
    files = {
        n: {"bytes": os.path.getsize(os.path.join(path, n)), "sha256": _sha256(os.path.join(path, n))}
        for n in names
    }
    storage.atomic_write_json(
        os.path.join(path, MANIFEST_FILE), {"format": MANIFEST_FORMAT, "step": step, "files": files}
    )


def verify(path: str) -> str | None:
    """What is wrong with a checkpoint dir's files (one line), or None. Checkpoints written before
    ``checkpoint.json`` existed are checked by parsing their trainer state only."""
    mpath = os.path.join(path, MANIFEST_FILE)
    if os.path.exists(mpath):
        try:
            manifest = storage.read_json(mpath)
            files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
        except (OSError, ValueError, AttributeError, KeyError):
            files = None
        if not isinstance(files, dict):
            return f"{MANIFEST_FILE} is unreadable"
        for name, entry in sorted(files.items()):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                return f"{name} is missing"
            if os.path.getsize(file) != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
                return f"{name} changed after it was written (size or sha256 differs from {MANIFEST_FILE})"
    try:
        state = read_state(path)
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({error_line(e)})"
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("step"), int)
        or not isinstance(state.get("loader"), dict)
    ):
        return f"{STATE_FILE} is not a vaejob trainer state (no step or loader position)"
    return None


def weights_fit(path: str, model: torch.nn.Module) -> str | None:
    """Whether the checkpoint's weights have the model's names and shapes (read from the file's header)."""
    try:
        with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
            shapes = {_strip_wrappers(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        return f"{WEIGHTS_FILE} is unreadable ({error_line(e)})"
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(mine.keys() | shapes.keys()):
        if mine.get(key) != shapes.get(key):
            return (
                f"{WEIGHTS_FILE} does not fit this config's model ({key}: checkpoint {shapes.get(key)}, "
                f"model {mine.get(key)}); resume with the config it was trained with, or use a new run.dir"
            )
    return None


def _rng_file_problem(path: str, rank: int, saved_world: int) -> str | None:
    file = os.path.join(path, RNG_FILE.format(rank))
    if not os.path.exists(file):
        return f"{os.path.basename(file)} is missing" if rank < saved_world else None
    try:
        states = accelerate_load(file)
        torch.ByteTensor(states["torch_manual_seed"])
    except Exception as e:  # noqa: BLE001 - whatever fails to unpickle: the file is damaged
        return f"{os.path.basename(file)} does not load ({error_line(e)})"
    return None


def _check_rng_restored(path: str, rank: int) -> None:
    """accelerate logs a failed RNG load at INFO and goes on: make sure the state is the saved one."""
    file = os.path.join(path, RNG_FILE.format(rank))
    if not os.path.exists(file):
        return
    states = accelerate_load(file)
    same = torch.equal(torch.get_rng_state(), states["torch_manual_seed"]) and all(
        np.array_equal(a, b) for a, b in zip(np.random.get_state(), states["numpy_random_seed"], strict=True)
    )
    if not same:
        raise JobFailure(f"{file}: the RNG state was not restored; the resume would not be exact")


def _storage_problem(directory: str) -> str | None:
    """The OS error a small write into ``directory`` meets now (a full disk, a read-only or vanished file
    system), or None: torch's writer loses the errno ("unexpected pos ...") and this finds it again."""
    probe = os.path.join(directory, f".vaejob-write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{directory}: {e.strerror} (errno {e.errno})"
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


def _free_path(directory: str, name: str) -> str:
    """``directory/name``, or ``name-1``, ``name-2``... (before the extension) if that exists already."""
    stem, ext = os.path.splitext(name)
    path, n = os.path.join(directory, name), 1
    while os.path.exists(path):
        path, n = os.path.join(directory, f"{stem}-{n}{ext}"), n + 1
    return path


class Checkpointer:
    """Saves at ``every`` steps (and on request), keeps the newest ``keep``, restores the one to resume."""

    def __init__(self, acc: Accelerator, run: RunDir, every: int, keep: int, ranks: CpuGroup) -> None:
        self.acc, self.run, self.every, self.keep, self.ranks = acc, run, every, keep, ranks

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(
        self, step: int, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> str:
        """Collective: every rank must call it at the same step; ``tensors`` (rank 0's) become
        ``NAME.safetensors`` files beside the weights. Raises ``CheckpointWriteError`` on every rank when any
        rank's part fails; the temp dir is removed and the previous checkpoints are untouched."""
        acc, run, main = self.acc, self.run, self.acc.is_main_process
        final = run.checkpoint(step)
        tmp = os.path.join(run.checkpoints, f".tmp-{step_dir_name(step)}")

        def prepare() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)

        def publish() -> None:
            for name, values in (tensors or {}).items():
                save_file(values, os.path.join(tmp, f"{name}.safetensors"))
            storage.atomic_write_json(os.path.join(tmp, STATE_FILE), {**state, "step": step})
            write_manifest(tmp, step)
            time.sleep(float(os.environ.get(TEST_DELAY_ENV, "0")))
            if os.path.exists(final):  # re-saving a step after a resume: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            storage.fsync_dir(run.checkpoints)
            for old in run.list_checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

        self._together(prepare if main else None, tmp, final)
        self._together(lambda: acc.save_state(tmp, safe_serialization=True), tmp, final)
        self._together(publish if main else None, tmp, final)
        return final

    def _together(self, part: Any, tmp: str, final: str) -> None:
        """Run this rank's part of a save; if any rank's part failed, every rank raises the first error."""
        error = None
        if part is not None:
            try:
                part()
            except OSError as e:
                error = error_line(e)
            except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError
                error = _storage_problem(os.path.dirname(tmp)) or error_line(e)
        error = self.ranks.first_error(error)
        if error is not None:
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(f"cannot write checkpoint {final}: {error}")

    def restore(self, resume: str, model: torch.nn.Module) -> tuple[str, dict[str, Any]] | None:
        """Collective. Load the checkpoint ``run.resume`` asks for into the prepared model, optimizer and RNGs
        (see the module docstring); returns its path and trainer state, or None for a fresh start."""
        explicit = resume not in ("auto", "never")
        for path in self.run.resume_candidates(resume):
            problem, fits = self._preflight(path, model)
            if problem is None:
                state = read_state(path)
                self.acc.load_state(path)
                _check_rng_restored(path, self.acc.process_index)
                if explicit:
                    self._abandon_newer(path, int(state["step"]))
                return path, state
            if explicit or not fits:
                raise CheckpointError(f"cannot resume from {path}: {problem}")
            self._move_aside(path, problem)
        return None

    def _abandon_newer(self, resumed: str, step: int) -> None:
        """Collective. A rollback: move the run dir's other checkpoints at ``step`` or later (and the metrics
        logged after ``step``) to ``checkpoints/abandoned/``, so that auto-resume follows this lineage."""
        self.acc.wait_for_everyone()  # every rank has loaded: a failed load moves nothing
        if self.acc.is_main_process:
            newer = [
                path
                for path in self.run.list_checkpoints()
                if int(os.path.basename(path).removeprefix("step_")) >= step
                and os.path.realpath(path) != os.path.realpath(resumed)
            ]
            if newer:
                moved = [
                    self._aside(path, ABANDONED_DIR) for path in newer
                ]  # first: the lineage matters most
                where = os.path.dirname(moved[0])
                metrics = _free_path(where, f"metrics-after-{step_dir_name(step)}.jsonl")
                truncate_metrics(self.run.metrics, step, dropped_to=metrics)
                names = ", ".join(os.path.basename(p) for p in newer)
                renamed = ", ".join(os.path.basename(p) for p in moved)
                also = (
                    f" and metrics.jsonl's records after step {step} to {metrics}"
                    if os.path.exists(metrics)
                    else ""
                )
                log.warning(
                    f"resuming {resumed} (step {step}), older than the run dir's newest checkpoint: moved "
                    f"{names} to {where}/{'' if renamed == names else f' (as {renamed})'}{also}, so "
                    "run.resume=auto continues from this step"
                )
        self.acc.wait_for_everyone()

    def _preflight(self, path: str, model: torch.nn.Module) -> tuple[str | None, bool]:
        """(what is wrong, whether the weights fit the model) agreed by every rank; nothing is loaded."""
        main = self.acc.is_main_process
        problem = self.ranks.broadcast(verify(path) if main else None)  # rank 0 hashes: one read of the files
        if problem is not None:
            return problem, True
        misfit = self.ranks.first_error(weights_fit(path, model))
        if misfit is not None:
            return misfit, False
        saved_world = int(read_state(path).get("world_size", self.acc.num_processes))
        return self.ranks.first_error(_rng_file_problem(path, self.acc.process_index, saved_world)), True

    def _aside(self, path: str, kind: str) -> str:
        """Rank 0: rename a checkpoint dir into ``checkpoints/KIND/`` under a free name (one atomic rename:
        list_checkpoints never sees it half moved); returns where it went."""
        aside = _free_path(os.path.join(self.run.checkpoints, kind), os.path.basename(path))
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        os.replace(path, aside)
        storage.fsync_dir(self.run.checkpoints)
        return aside

    def _move_aside(self, path: str, problem: str) -> None:
        if self.acc.is_main_process:
            aside = self._aside(path, CORRUPT_DIR)
            log.warning(
                f"checkpoint {path} is damaged ({problem}): moved to {aside}; trying the one before it"
            )
        self.acc.wait_for_everyone()


class LoadedRun(NamedTuple):
    model: VAE  # in eval mode, on the CPU
    cfg: Config  # run.dir set to the run dir given, so a moved run dir still works
    step: int
    checkpoint: str
    weights: str  # "ema" or "raw": which of the checkpoint's weights the model holds


def run_target(run_dir: str) -> dict[str, Any]:
    """The image shape a run trained with, as ``open_shards`` keywords (defaults when its config is
    unreadable: ``load_model`` then reports that)."""
    try:
        return load_config(RunDir(run_dir).config).data.target()
    except (ConfigError, OSError):
        return {}


def load_model(
    run_dir: str,
    checkpoint: str | None = None,
    image_shape: tuple[int, int, int] | None = None,
    weights: str = "auto",
) -> LoadedRun:
    """The model of a run (``checkpoint`` or its newest complete one), its config, step and checkpoint dir.
    ``weights``: ``ema`` (the averaged weights), ``raw`` (the optimizer's), ``auto`` = ema when it has them.

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
    cfg, _ = resolve_auto(cfg)  # training writes resolved values; a hand-written config.yaml may say auto
    cfg.run.dir = run_dir
    path = checkpoint or run.latest_checkpoint()
    if path is None:
        raise CheckpointError(
            f"no complete checkpoint in {run.checkpoints}; train longer or pass --checkpoint"
        )
    ema_file = os.path.join(path, EMA_FILE)
    if weights == "ema" and not os.path.isfile(ema_file):
        raise CheckpointError(
            f"{path} holds no EMA weights (trained with train.ema_decay=0); use --weights raw"
        )
    chosen = "ema" if weights == "ema" or (weights == "auto" and os.path.isfile(ema_file)) else "raw"
    weights_path = ema_file if chosen == "ema" else os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(os.path.join(path, STATE_FILE)) or not os.path.isfile(weights_path):
        raise CheckpointError(
            f"{path} is not a complete vaejob checkpoint (needs {STATE_FILE} and {WEIGHTS_FILE})"
        )
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({problem}); pass --checkpoint with another one "
            "(training with run.resume=auto moves damaged ones to checkpoints/corrupt/)"
        )
    if image_shape is None:
        try:
            image_shape = open_shards(cfg.data.shards, **cfg.data.target()).image_shape
        except DataError as e:
            raise CheckpointError(f"cannot read the run's image shape from data.shards: {e}") from None
    try:
        model = build_model(cfg.model, cfg.loss, image_shape)
        state = {_strip_wrappers(k): v for k, v in load_file(weights_path).items()}
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, SafetensorError, OSError) as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{weights_path} does not fit {run.config} and images {image_shape} ({detail}); "
            "pass the run dir the checkpoint came from"
        ) from None
    return LoadedRun(model.eval(), cfg, int(read_state(path)["step"]), path, chosen)


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key
