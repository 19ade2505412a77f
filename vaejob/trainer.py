"""The Trainer: one training job from resume to its last checkpoint (``vaejob.train`` is its command line).

One step: uint8 batch -> device -> float -> VAE -> fp32 loss -> backward -> (clip) -> AdamW with warm-up +
cosine LR (-> the EMA of the weights). Each cadence has its owner: the log window (``tracking.TrainLog``), an
exact validation pass over the whole val split (``metrics.Validator``), FID (``fid.FidEvaluator``), samples and
reconstructions (``figures.TrainingFigures``), checkpoints (``checkpoint.Checkpointer``). SIGTERM/SIGUSR1 finish
the current step on every rank, checkpoint and exit ``EXIT_PREEMPTED`` so the launcher requeues (``preempt``);
``run.resume=auto`` continues exactly.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from safetensors.torch import load_file

from vaejob import storage
from vaejob.checkpoint import EMA_FILE, Checkpointer
from vaejob.cli import (
    EXIT_FAILED,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    LOG_NAME,
    JobFailure,
    error_line,
)
from vaejob.config import Config, prepare_storage
from vaejob.device import agree_across_ranks, resolve_auto, use_deterministic_algorithms
from vaejob.ema import EMA
from vaejob.fid import FidEvaluator, fid_settings
from vaejob.figures import TrainingFigures, first_images
from vaejob.lease import Lease, RunDirLost, hold
from vaejob.loader import Batch, ShardLoader, make_loader, unit_float
from vaejob.loader.binarize import eval_binarize
from vaejob.loss import LossOut, beta_at, vae_loss
from vaejob.metrics import Validator
from vaejob.models import VAE, build_model
from vaejob.optim import NonFiniteError, StepGuard, build_optimizer, lr_at, set_lr
from vaejob.preempt import ABORT, StopRequest
from vaejob.ranks import CpuGroup, describe_rank, is_collective_failure, replica_digest
from vaejob.rundir import RunDir
from vaejob.seeding import derived_seed
from vaejob.shards import DataError, ShardSet, open_shards
from vaejob.tracking import (
    Tracker,
    TrainLog,
    WandbKeyMissing,
    read_metrics,
    require_wandb_key,
    resolve_run_id,
)

log = logging.getLogger(LOG_NAME)


@dataclass
class StepResult:
    out: LossOut
    lr: float
    grad_norm: torch.Tensor  # before clipping; of the unscaled gradients under fp16 loss scaling
    applied: bool  # False: the step guard dropped it (an fp16 overflow is the scaler's: True)


class Trainer:
    def __init__(self, cfg: Config, shards: ShardSet | None = None) -> None:
        cfg, resolved = resolve_auto(cfg)  # `auto` values first: the Accelerator takes the precision
        self.cfg = cfg
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        use_deterministic_algorithms(t.deterministic)
        if shards is None:
            prepare_storage(cfg, {"data.shards": cfg.data.shards, "samples.root": cfg.samples.root})
        self.shards = shards or open_shards(cfg.data.shards, verify=cfg.data.verify, **cfg.data.target())
        if self.shards.split("val").count == 0:  # validation, samples and figures all read it
            raise DataError(
                f"the val split of {self.shards.root} is empty; re-create the shard set with --val-fraction > 0"
            )
        timeout = timedelta(seconds=cfg.run.collective_timeout_s)  # a hung peer fails the job, bounded
        self.acc = Accelerator(
            mixed_precision=t.mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)]
        )
        self.rank, self.world, self.device = self.acc.process_index, self.acc.num_processes, self.acc.device
        self.ranks = CpuGroup(self.world, timeout)
        self.cfg = cfg = agree_across_ranks(cfg, resolved, self.ranks, announce=self.acc.is_main_process)
        self.image_shape = self.shards.image_shape
        self.run = RunDir(cfg.run.dir)

        set_seed(t.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        model = build_model(cfg.model, cfg.loss, self.image_shape)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.opt = self.acc.prepare(model, build_optimizer(model, t))
        # From here on each rank draws its own noise (the reparameterisation's ε): the same ε on every rank
        # would give W processes' batches one process's gradient noise. Checkpoints keep each rank's RNG state.
        torch.manual_seed(derived_seed(t.seed, f"rank{self.rank}"))
        if t.mixed_precision == "fp16" and self.acc.scaler is None and self.acc.is_main_process:
            log.warning(
                "train.mixed_precision=fp16 runs in fp32 on a CPU: accelerate has no fp16 autocast or loss "
                "scaling there; use bf16 (or auto) for mixed precision on a CPU"
            )
        if t.compile:
            self.model = torch.compile(self.model, mode=None if t.compile is True else t.compile)
        self.train_loader = self._loader("train")
        self.val_loader = self._loader("val", with_keys=True)  # the val pass seeds its noise by sample key
        self.checkpointer = Checkpointer(
            self.acc, self.run, t.checkpoint_every, t.keep_checkpoints, self.ranks
        )
        self.validator = Validator(
            self.acc,
            self.val_loader,
            cfg.loss,
            t.seed,
            t.eval_every,
            self.to_input,
            self.shards,
            binarize=cfg.data.binarize,
        )
        self.guard = StepGuard(t, self.device, self.world)
        self.ema = EMA(self.unwrapped, t.ema_decay) if t.ema_decay > 0 else None
        self.fid = FidEvaluator(self.acc, self.ranks, **fid_settings(cfg.fid)) if t.fid_every else None
        self.stop = StopRequest(self.ranks, announce=self.acc.is_main_process)
        self.lease = Lease(self.run.lease, cfg.run.lease_timeout_s) if self.acc.is_main_process else None
        self.step = 0
        self.run_id = ""
        self.last_val: dict[str, Any] | None = None

    def _loader(self, split: str, **kw: Any) -> ShardLoader:
        c = self.cfg
        args = dict(
            seed=c.train.seed,
            rank=self.rank,
            world_size=self.world,
            num_workers=c.data.num_workers,
            shuffle_buffer=c.data.shuffle_buffer,
            raw=True,  # uint8 to the device, converted there: 4x less host-to-device traffic
            pin_memory=self.device.type == "cuda",
            # Binarised batches are drawn on the device from the sample keys (val: the fixed draw).
            binarize=c.data.binarize if split == "train" else eval_binarize(c.data.binarize),
            device=self.device,
        )
        args.update(kw)
        return make_loader(self.shards, split, c.train.batch_size, **args)

    @property
    def unwrapped(self) -> VAE:
        # The plain module (evaluation and figures run it eagerly): accelerate's unwrap keeps torch.compile's
        # wrapper and re-points that wrapper at the bare model, past DDP.
        return self.acc.unwrap_model(getattr(self.model, "_orig_mod", self.model))

    @property
    def eval_model(self) -> VAE:
        """What validation, FID, samples and figures measure: the averaged weights when there are any."""
        return self.ema.module if self.ema is not None else self.unwrapped

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        x = unit_float(images.to(self.device, non_blocking=True))
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def info(self, msg: str) -> None:
        if self.acc.is_main_process:
            log.info(msg)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective (the log window is reduced, so a resumed run logs the same averages)."""
        return {
            "step": self.step,
            **self.log.state_dict(),
            "loader": self.train_loader.state_dict(),
            "wandb_run_id": self.run_id,
            "skipped_steps": self.guard.skipped_steps,
            "nonfinite_skips": self.guard.nonfinite_skips,
            "consecutive_skips": self.guard.consecutive,
            "world_size": self.world,
            "image_shape": list(self.image_shape),
            "ema_updates": self.ema.updates if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.guard.skipped_steps = state.get("skipped_steps", 0)
        self.guard.nonfinite_skips = state.get("nonfinite_skips", self.guard.skipped_steps)
        self.guard.consecutive = state.get("consecutive_skips", 0)
        self.run_id = state.get("wandb_run_id", "")
        self.train_loader.load_state_dict(state["loader"])
        self.log.load_state_dict(state)

    def restore_ema(self, checkpoint: str, state: dict[str, Any]) -> None:
        if self.ema is None:
            return
        path = os.path.join(checkpoint, EMA_FILE)
        if os.path.exists(path):
            self.ema.load_state_dict(
                load_file(path, device=str(self.device)), int(state.get("ema_updates") or 0)
            )
        else:
            self.ema = EMA(self.unwrapped, self.cfg.train.ema_decay)
            self.info(f"{checkpoint} holds no EMA weights: the average starts from the resumed weights")

    # -- the job --------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """The whole job: hold the run dir, resume, train, and say how it ended (status.json, exit code)."""
        if self.lease is not None:
            os.makedirs(self.cfg.run.dir, exist_ok=True)
        hold(self.lease, self.ranks, lambda reason: self.stop.request(reason, ABORT))
        try:
            self.start()
            with self.stop.installed():
                code = self.loop()
            if code == EXIT_OK:
                self.check_replicas()
        except NonFiniteError as e:
            self.info(f"stopping: {e}; the last good checkpoint is {self.run.latest_checkpoint()}")
            self.finish(EXIT_NONFINITE, str(e))
            return EXIT_NONFINITE
        except WandbKeyMissing as e:  # raised on every rank at once: they end together, status.json first
            self.finish(EXIT_USAGE, str(e))
            raise
        except BaseException as e:
            self.finish(EXIT_FAILED, self.failure_line(e), collective=False)  # a rank may be gone: no waiting
            if isinstance(e, JobFailure | OSError) or is_collective_failure(e):
                raise JobFailure(self.failure_line(e)) from e
            raise
        self.finish(code, self.stop.reason if code == EXIT_PREEMPTED else "")
        return code

    def start(self) -> None:
        """Resume (or start fresh), then open the run's outputs: config, W&B id, tracker, log, figures."""
        cfg, main = self.cfg, self.acc.is_main_process
        restored = self.checkpointer.restore(cfg.run.resume, self.unwrapped)
        state = restored[1] if restored is not None else {}
        self.run_id = resolve_run_id(self.run, state.get("wandb_run_id", ""), resumed=bool(state))
        self.step = state.get("step", 0)  # status.json names the step a refusal leaves the run at
        require_wandb_key(cfg, self.ranks, main)  # before anything is written: config, W&B id, metrics
        before = self.run.read_status() if main and state else None  # how the job before this one ended
        if main:
            storage.atomic_write_text(self.run.config, cfg.to_yaml())
            storage.atomic_write_text(self.run.wandb_id, self.run_id + "\n")
        self.tracker = Tracker(cfg, self.run_id, enabled=main, resume_step=state["step"] if state else None)
        if before is not None and before.get("state") == "running":  # it died without a word: W&B lacks rows
            relogged = self.tracker.relog_after(int(before.get("step", 0)))  # the step that job started at
            if relogged:
                self.info(
                    f"the job before this one died: {relogged} metrics.jsonl records logged to W&B again"
                )
        self.log = TrainLog(self.acc, self.tracker, cfg, state.get("step", 0))
        if restored is not None:
            self.load_state_dict(state)
            self.restore_ema(restored[0], state)
            self.info(f"resumed from {restored[0]} at step {self.step}")
        if main:
            self.write_status("running")
        self.figures = TrainingFigures(
            cfg.samples,
            cfg.samples.root or cfg.run.dir,
            cfg.train.sample_every,
            self.tracker,
            first_images(self._loader("val", rank=0, world_size=1, num_workers=0), cfg.samples.recon)
            if main
            else None,
            cfg.wandb.log_images,
            self.shards.label_names,
        )
        self.info(
            f"training {cfg.model.name} VAE ({sum(p.numel() for p in self.unwrapped.parameters()) / 1e6:.2f}M "
            f"parameters) on {self.shards.root} {self.image_shape}: {self.world} process(es) "
            f"x batch {cfg.train.batch_size}, {len(self.train_loader)} steps/epoch, "
            f"step {self.step} -> {cfg.train.max_steps}, run dir {cfg.run.dir}"
        )
        log.info(
            f"{describe_rank(self.rank, self.world)}: {len(self.train_loader)} batches per epoch"
        )  # every rank: its own line

    def finish(self, code: int, reason: str, collective: bool = True) -> None:
        """Close everything, record how the job ended (rank 0), give the run dir back. After a failure that
        may have left a rank behind (``collective=False``) nothing waits for the other ranks."""
        for close in (getattr(self, "log", None), self.train_loader, self.val_loader):
            if close is not None:
                close.close()  # the progress bar; the loader worker processes (kept across epochs)
        lost = self.stop.level == ABORT
        if self.acc.is_main_process and not lost:  # a job that lost its run dir must not write into it
            state = {EXIT_OK: "completed", EXIT_PREEMPTED: "preempted"}.get(code, "failed")
            try:
                self.write_status(state, reason)
            except OSError as e:
                log.warning(f"cannot write {self.run.status}: {error_line(e)}")
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.finish(exit_code=0 if code in (EXIT_OK, EXIT_PREEMPTED) else code)
        if self.lease is not None and not lost:
            self.lease.release()
        if collective:
            self.acc.wait_for_everyone()
            self.acc.end_training()

    def failure_line(self, e: BaseException) -> str:
        last = self.run.latest_checkpoint()
        keep = f"; the last complete checkpoint is {last}" if last else ""
        if isinstance(e, RunDirLost):
            return f"stopped writing {self.cfg.run.dir}: {e}"
        if isinstance(e, JobFailure):
            return f"{e}{keep}"
        if is_collective_failure(e):
            return f"lost contact with another rank ({error_line(e)[:300]}){keep}"
        return f"{error_line(e)}{keep}"

    def check_replicas(self) -> None:
        """Collective: DDP keeps every rank's weights identical; each rank says so, and the job fails if not."""
        digest = replica_digest(self.unwrapped)
        log.info(
            f"{describe_rank(self.rank, self.world)}: finished at step {self.step}, weights sha256 {digest}"
        )
        digests = self.ranks.gather(digest)
        if len(set(digests)) > 1:
            raise JobFailure(
                f"the ranks' weights differ at the end (sha256 {digests}): DDP replicas diverged"
            )

    def loop(self) -> int:
        max_steps = self.cfg.train.max_steps
        batches = self.train_batches()
        self.model.train()
        while self.step < max_steps:
            done = self.train_step(next(batches))
            self.step += 1
            if self.shards.indexed and self.train_loader.batch == len(self.train_loader):
                self.log.epoch_skips(self.step, self.train_loader.epoch, self.train_loader.skipped)
            final = self.step == max_steps
            out = done.out
            self.log.add(out.loss, out.recon, out.kl, len(out.recon) * self.world, applied=done.applied)
            if self.log.due(self.step) or final:
                self.guard.check()
                self.log.write(
                    self.step,
                    lr=done.lr,
                    beta=beta_at(self.step - 1, self.cfg.loss),
                    grad_norm=float(done.grad_norm),
                    epoch=self.train_loader.epoch,
                    skipped_steps=self.guard.skipped_steps,
                )
            evaluate_now = self.validator.due(self.step) or final
            fid_now = self.fid is not None and (self.step % self.cfg.train.fid_every == 0 or final)
            if evaluate_now or fid_now:
                self.share_rank0_buffers()
            if evaluate_now:
                self.validate()
            if fid_now:
                record = self.fid.evaluate(
                    self.eval_model, self.shards, "val", self.cfg.fid.samples, self.cfg.fid.real or None
                )
                self.tracker.log({"step": self.step, "split": "fid", **record, "time": time.time()})
            if (self.figures.due(self.step) or final) and self.acc.is_main_process:
                with self.acc.autocast():
                    self.figures.write_samples(self.eval_model, self.step, self.device)
            stop = self.stop.agreed()
            if stop == ABORT:
                raise RunDirLost(self.stop.reason or "another rank lost the run dir")
            if self.checkpointer.due(self.step) or final or stop:
                self.save_checkpoint()
            if stop and not final:
                where = describe_rank(self.rank, self.world)
                log.info(
                    f"{where}: checkpointed at step {self.step} after a stop signal; exiting {EXIT_PREEMPTED}"
                )
                return EXIT_PREEMPTED
        if self.acc.is_main_process and self.cfg.samples.final_plots:
            self.write_final_plots()
        return EXIT_OK

    def train_batches(self) -> Iterator[Batch]:
        """Batches without end: each epoch of the loader, then the next one."""
        while True:
            yield from self.train_loader

    def train_step(self, batch: Batch) -> StepResult:
        t, loss_cfg = self.cfg.train, self.cfg.loss
        x = self.to_input(batch["image"])
        lr = lr_at(self.step, t)
        set_lr(self.opt, lr)
        k = loss_cfg.iw_samples
        model_out = self.model(x, samples=k) if k > 1 else self.model(x)
        out = vae_loss(
            self.unwrapped.likelihood, model_out, x, loss_cfg, beta_at(self.step, loss_cfg), samples=k
        )
        objective = out.loss
        if loss_cfg.spectral_reg > 0:  # NVAE: bounds each layer's gain (vaejob.models.spectral)
            objective = objective + loss_cfg.spectral_reg * self.unwrapped.spectral()
        self.acc.backward(objective)
        # Measured every step (a fused norm of the already all-reduced gradients): a NaN gradient under a
        # finite loss must not reach the weights or a checkpoint unnoticed; clipping and skipping read it too.
        if t.grad_clip > 0:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        else:  # the norm alone: clip_grad_norm_ would also rescale every gradient by 1
            self.acc.unscale_gradients()
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
        scaled = self.acc.scaler is not None  # fp16: the GradScaler skips overflowed steps itself
        if self.guard.skips(out.loss, grad_norm, self.step + 1, scaled):
            self.opt.zero_grad(set_to_none=True)
            if scaled:  # the norm unscaled the gradients: end the scaler's step without applying it
                self.acc.scaler.update()
            return StepResult(out, lr, grad_norm, applied=False)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.guard.record(out.loss, grad_norm, self.step + 1, scaled)
        if self.ema is not None:
            self.ema.update(self.unwrapped)
        return StepResult(out, lr, grad_norm, applied=True)

    def share_rank0_buffers(self) -> None:
        """Collective: every rank takes rank 0's buffers (BatchNorm statistics), which the checkpoint saves. Each
        rank's running statistics follow its own batches between DDP's per-forward broadcasts, so without
        this each rank would evaluate its part of the val split with a different model."""
        if self.world == 1:
            return
        models = [self.unwrapped] + ([self.ema.module] if self.ema is not None else [])
        for buffer in (b for m in models for b in m.buffers()):
            torch.distributed.broadcast(buffer, src=0)

    def validate(self) -> None:
        record = self.validator.run(self.eval_model, self.step)
        self.tracker.log(record)
        units = {"active z": f"{record['active_units']}/{self.unwrapped.latent_size}"}
        if "active_units_per_group" in record:
            units["per group"] = "/".join(str(a) for a in record["active_units_per_group"])
        if "dead_hidden_units" in record:
            units["dead hidden"] = f"{record['dead_hidden_units']}/{record['hidden_units']}"
        # Stranded units show at the first evaluation, not only in metrics.jsonl after the run.
        self.info(
            f"step {self.step} val -ELBO {record['nelbo']:.2f} nats, "
            + ", ".join(f"{k} {v}" for k, v in units.items())
        )
        self.log.show(val=f"{record['nelbo']:.2f}", **{k.replace(" ", "_"): v for k, v in units.items()})
        self.last_val = record

    def save_checkpoint(self) -> None:
        self.guard.check()
        tensors = (
            {EMA_FILE.removesuffix(".safetensors"): self.ema.state_dict()} if self.ema is not None else None
        )
        path = self.checkpointer.save(self.step, self.state_dict(), tensors)
        self.info(f"checkpoint {path}")

    def write_status(self, state: str, reason: str = "") -> None:
        self.run.write_status(state, self.step, self.cfg.train.max_steps, self.run_id, reason)

    def write_final_plots(self) -> None:
        self.figures.write_final(
            self.eval_model,
            self.step,
            self._loader("val", rank=0, world_size=1, num_workers=0),
            read_metrics(self.run.metrics),  # the whole run's curves, earlier job segments included
            self.device,
        )
