"""The training job: ``accelerate launch vaejob/train.py --config configs/fashion_mnist.yaml [key=value ...]``.

Also ``python vaejob/train.py`` / ``python -m vaejob.train`` (one process). Every launcher (accelerate, torchrun,
``slurm/train.sh``, ``launch/submit.py``) ends up in ``run(cfg)``; distributed set-up comes from the environment.

One step: uint8 batch -> device -> float -> VAE -> fp32 loss -> backward -> (clip) -> AdamW with warm-up +
cosine LR. Every ``eval_every`` steps an exact validation pass over the whole val split (reduced across
ranks); every ``sample_every`` generated samples + reconstructions to storage; every ``checkpoint_every`` a
checkpoint. SIGTERM/SIGUSR1 (what SLURM sends before preemption or the time limit) finish the current step,
checkpoint and exit with ``EXIT_PREEMPTED`` so the launcher requeues; ``run.resume=auto`` continues exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python vaejob/train.py` / `accelerate launch vaejob/train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed

from vaejob import checkpoint, storage
from vaejob.config import Config, ConfigError, load_config
from vaejob.data import DataError, make_loader, open_shards
from vaejob.loss import beta_at, bits_per_dim, vae_loss
from vaejob.model import VAE, build_model
from vaejob.tracking import Tracker, new_run_id, read_metrics

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 1, 2, 3, 75
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: a latent dim is active if Var_x E[z_d|x] > 0.01

log = logging.getLogger("vaejob")


class NonFiniteError(RuntimeError):
    pass


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the model's parameters. The fused kernel on CPU and CUDA: one pass over all parameters
    instead of ~10 small ops per tensor (measured 0.2 vs 0.8 ms a step on CPU for the default model, about 5%
    of a batch-32 step); the same update up to float rounding."""
    t = cfg.train
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(
        params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, fused=fused or None
    )


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        self.acc = Accelerator(mixed_precision=t.mixed_precision)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.device = self.acc.device
        self.shards = open_shards(cfg.data.shards, verify=cfg.data.verify)
        self.image_shape = self.shards.image_shape

        set_seed(t.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        model = build_model(cfg.model, self.image_shape)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer(model, cfg)
        self.model, self.opt = self.acc.prepare(model, opt)
        if t.compile:
            self.model = torch.compile(self.model)
        self.train_loader = self._loader("train")
        self.val_loader = self._loader("val")
        self.step = 0
        self.window = torch.zeros(3, device=self.device)  # loss, recon, kl sums over the open log window
        self.window_steps = 0
        self.run_id = ""
        self.stop_requested = False
        self.skipped_steps = 0
        # Non-finite losses are recorded on the device (no per-step host sync) and checked at log boundaries.
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.progress: Any = None  # rank 0's tqdm bar while the loop runs
        self.postfix: dict[str, str] = {}
        self.signal_group = None
        if self.world > 1 and dist.get_backend() != "gloo":
            self.signal_group = dist.new_group(backend="gloo")  # stop flag on CPU: no GPU sync per step

    # -- pieces -------------------------------------------------------------------------------------------
    def _loader(self, split: str, **kw: Any):
        c = self.cfg
        args = dict(
            seed=c.train.seed,
            rank=self.rank,
            world_size=self.world,
            num_workers=c.data.num_workers,
            shuffle_buffer=c.data.shuffle_buffer,
            raw=True,
            pin_memory=self.device.type == "cuda",
        )
        args.update(kw)
        return make_loader(self.shards, split, c.train.batch_size, **args)

    @property
    def unwrapped(self) -> VAE:
        return self.acc.unwrap_model(self.model)

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return t.lr
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["image"].to(self.device, non_blocking=True).float().div_(255.0)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def state_dict(self) -> dict[str, Any]:
        """Collective (reduces the open log window so a resumed run logs the same averages)."""
        return {
            "step": self.step,
            "log_window": self.acc.reduce(self.window, reduction="mean").tolist(),
            "log_window_steps": self.window_steps,
            "loader": self.train_loader.state_dict(),
            "wandb_run_id": self.run_id,
            "skipped_steps": self.skipped_steps,
            "world_size": self.world,
            "image_shape": list(self.image_shape),
        }

    # -- resume -------------------------------------------------------------------------------------------
    def resume_path(self) -> str | None:
        r = self.cfg.run.resume
        if r == "never":
            if checkpoint.latest_checkpoint(self.cfg.run.dir):
                raise ConfigError(
                    f"run.resume=never but {self.cfg.run.dir} already holds checkpoints; "
                    "use run.resume=auto to continue it or pick a new run.dir"
                )
            return None
        if r == "auto":
            return checkpoint.latest_checkpoint(self.cfg.run.dir)
        if not os.path.isfile(os.path.join(r, checkpoint.STATE_FILE)):
            raise ConfigError(
                f"run.resume={r!r} is not a complete checkpoint dir; use auto, never or a step_XXXXXXXX dir"
            )
        return r

    def restore(self) -> int | None:
        path = self.resume_path()
        if path is None:
            return None
        state = checkpoint.load(self.acc, path)
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.run_id = state.get("wandb_run_id", "")
        self.train_loader.load_state_dict(state["loader"])
        self.window = torch.tensor(state["log_window"], device=self.device)
        self.window_steps = state["log_window_steps"]
        self.info(f"resumed from {path} at step {self.step}")
        return self.step

    # -- the job ------------------------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        if self.acc.is_main_process:
            log.info(msg)

    def fit(self) -> int:
        cfg = self.cfg
        main = self.acc.is_main_process
        if main:
            os.makedirs(cfg.run.dir, exist_ok=True)
        self.acc.wait_for_everyone()
        resumed_at = self.restore()
        id_file = os.path.join(cfg.run.dir, "wandb_id.txt")
        if not self.run_id and os.path.exists(id_file) and resumed_at is not None:
            self.run_id = open(id_file).read().strip()
        self.run_id = self.run_id or new_run_id()
        if main:
            storage.atomic_write_text(os.path.join(cfg.run.dir, "config.yaml"), cfg.to_yaml())
            storage.atomic_write_text(id_file, self.run_id + "\n")
            self.write_status("running")
        self.tracker = Tracker(cfg, self.run_id, enabled=main, resume_step=resumed_at)
        self.fixed_images = self.first_val_images(cfg.samples.recon) if main else None
        self.info(
            f"training {cfg.model.name} VAE on {self.shards.root} {self.image_shape}: {self.world} process(es) "
            f"x batch {cfg.train.batch_size}, {len(self.train_loader)} steps/epoch, "
            f"step {self.step} -> {cfg.train.max_steps}, run dir {cfg.run.dir}"
        )
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            code = self.loop()
        except NonFiniteError as e:
            self.info(
                f"stopping: {e}; the last good checkpoint is {checkpoint.latest_checkpoint(cfg.run.dir)}"
            )
            code = EXIT_NONFINITE
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.train_loader.close()  # the loader worker processes (kept across epochs)
            self.val_loader.close()
        state = {EXIT_OK: "completed", EXIT_PREEMPTED: "preempted"}.get(code, "failed")
        if main:
            self.write_status(state)
        self.tracker.finish(exit_code=0 if code in (EXIT_OK, EXIT_PREEMPTED) else code)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return code

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        self.info(f"received {signal.Signals(signum).name}: checkpointing after this step")

    def should_stop(self) -> bool:
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.signal_group)
        return bool(flag.item() > 0)

    def write_status(self, state: str) -> None:
        status = {
            "state": state,
            "step": self.step,
            "max_steps": self.cfg.train.max_steps,
            "run_id": self.run_id,
        }
        storage.atomic_write_json(os.path.join(self.cfg.run.dir, "status.json"), status)

    def loop(self) -> int:
        t, main = self.cfg.train, self.acc.is_main_process
        progress = self.progress = None
        if main and t.progress:
            from tqdm import tqdm

            progress = self.progress = tqdm(
                total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr
            )
        window_images, window_start = 0, time.perf_counter()
        batches = iter(self.train_loader)
        self.model.train()
        while self.step < t.max_steps:
            batch = next(batches, None)
            if batch is None:  # end of epoch: the loader has moved on to the next one
                batches = iter(self.train_loader)
                continue
            x = self.to_input(batch)
            lr = self.lr_at(self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            logits, mu, logvar = self.model(x)
            out = vae_loss(logits, x, mu, logvar, self.cfg.loss, beta_at(self.step, self.cfg.loss))
            self.acc.backward(out.loss)
            log_now = (self.step + 1) % t.log_every == 0
            grad_norm = None
            if t.grad_clip > 0 or log_now or t.on_nonfinite == "skip":
                grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
            if t.on_nonfinite == "skip" and not torch.isfinite(grad_norm):
                # grads are all-reduced, so every rank takes the same decision here
                self.opt.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                if self.skipped_steps > t.max_skipped_steps:
                    raise NonFiniteError(
                        f"more than {t.max_skipped_steps} non-finite steps (step {self.step + 1})"
                    )
            else:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                bad = ~torch.isfinite(out.loss.detach())
                self.first_bad_step.copy_(
                    torch.where(bad & (self.first_bad_step < 0), self.step + 1, self.first_bad_step)
                )
            self.window += torch.stack([out.loss.detach(), out.recon.detach().mean(), out.kl.detach().mean()])
            self.window_steps += 1
            window_images += x.shape[0] * self.world
            self.step += 1
            if progress is not None:
                progress.update(1)

            if log_now or self.step == t.max_steps:
                self.check_finite()
                n = self.window_steps
                sums = self.acc.reduce(self.window, reduction="mean").tolist()
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": self.step,
                    "split": "train",
                    "loss": sums[0] / n,
                    "recon": sums[1] / n,
                    "kl": sums[2] / n,
                    "lr": lr,
                    "beta": beta_at(self.step - 1, self.cfg.loss),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "images_per_s": window_images / elapsed,
                    "epoch": self.train_loader.epoch,
                    "time": time.time(),  # wall clock: time to quality from the job's launch
                }
                if self.skipped_steps:
                    record["skipped_steps"] = self.skipped_steps
                self.tracker.log(record)
                if progress is not None:
                    self.postfix.update(loss=f"{record['loss']:.2f}", img_s=f"{record['images_per_s']:.0f}")
                    progress.set_postfix(self.postfix)
                self.window.zero_()
                self.window_steps = 0
                window_images, window_start = 0, time.perf_counter()

            final = self.step == t.max_steps
            if self.step % t.eval_every == 0 or final:
                self.evaluate()
            if self.step % t.sample_every == 0 or final:
                self.write_samples()
            stop = self.should_stop()
            if self.step % t.checkpoint_every == 0 or final or stop:
                self.save_checkpoint()
            if stop and not final:
                if progress is not None:
                    progress.close()
                self.info(f"checkpointed at step {self.step} after a stop signal; exiting {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
        if progress is not None:
            progress.close()
        if self.acc.is_main_process and self.cfg.samples.final_plots:
            self.write_final_plots()
        return EXIT_OK

    def check_finite(self) -> None:
        bad = self.first_bad_step.clone()
        if self.world > 1:
            bad = _all_max(bad)
        first = int(bad)
        if first >= 0:
            raise NonFiniteError(f"non-finite loss at step {first}")

    def save_checkpoint(self) -> None:
        self.check_finite()
        path = checkpoint.save(
            self.acc, self.cfg.run.dir, self.step, self.state_dict(), self.cfg.train.keep_checkpoints
        )
        self.info(f"checkpoint {path}")

    # -- evaluation, samples, plots -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact metrics over the whole val split: each sample counted once across ranks (padding masked)."""
        model = self.unwrapped
        was_training = model.training
        model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)  # same z noise every eval
        d = model.latent_dim
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # recon, kl, count
        mu_sum = torch.zeros(d, dtype=torch.float64, device=self.device)
        mu_sq = torch.zeros(d, dtype=torch.float64, device=self.device)
        hidden_max = None
        self.val_loader.set_epoch(0)
        for batch in self.val_loader:
            x = self.to_input(batch)
            valid = batch["valid"].to(self.device)
            with self.acc.autocast():
                mu, logvar, h = model.encode_hidden(x)
                z = mu + torch.exp(0.5 * logvar) * torch.randn(
                    mu.shape, generator=gen, device=self.device, dtype=mu.dtype
                )
                logits = model.decode(z)
            out = vae_loss(logits, x, mu, logvar, self.cfg.loss, 1.0)
            w = valid.double()
            sums += torch.stack([(out.recon.double() * w).sum(), (out.kl.double() * w).sum(), w.sum()])
            mu64 = mu.double() * w[:, None]
            mu_sum += mu64.sum(0)
            mu_sq += (mu64 * mu.double()).sum(0)
            if model.has_bottleneck:
                hmax = torch.where(valid[:, None], h.float(), torch.full_like(h.float(), -torch.inf)).amax(0)
                hidden_max = hmax if hidden_max is None else torch.maximum(hidden_max, hmax)
        sums, mu_sum, mu_sq = (self.acc.reduce(v, reduction="sum") for v in (sums, mu_sum, mu_sq))
        count = sums[2].item()
        var = mu_sq / count - (mu_sum / count) ** 2
        recon, kl = sums[0].item() / count, sums[1].item() / count
        record = {
            "step": self.step,
            "split": "val",
            "loss": recon + kl,
            "nelbo": recon + kl,
            "recon": recon,
            "kl": kl,
            "bits_per_dim": bits_per_dim(recon + kl, self.image_shape),
            "active_units": int((var > ACTIVE_UNIT_THRESHOLD).sum().item()),
            "count": int(count),
        }
        units = {"active z": f"{record['active_units']}/{d}"}
        if hidden_max is not None:
            if self.world > 1:
                hidden_max = _all_max(hidden_max)
            record["dead_hidden_units"] = int((hidden_max <= 0).sum().item())
            record["hidden_units"] = int(hidden_max.numel())
            units["dead hidden"] = f"{record['dead_hidden_units']}/{record['hidden_units']}"
        record["time"] = time.time()
        self.tracker.log(record)
        # Stranded units show at the first evaluation, not only in metrics.jsonl after the run.
        self.info(
            f"step {self.step} val -ELBO {record['nelbo']:.2f} nats, "
            + ", ".join(f"{k} {v}" for k, v in units.items())
        )
        if self.progress is not None:
            self.postfix.update(
                val=f"{record['nelbo']:.2f}", **{k.replace(" ", "_"): v for k, v in units.items()}
            )
            self.progress.set_postfix(self.postfix)
        if was_training:
            model.train()
        return record

    def first_val_images(self, n: int) -> torch.Tensor:
        loader = self._loader("val", rank=0, world_size=1, num_workers=0)
        images = []
        for batch in loader:
            images.append(batch["image"][batch["valid"]])
            if sum(len(i) for i in images) >= n:
                break
        return torch.cat(images)[:n].float().div_(255.0)

    def write_samples(self) -> None:
        if not self.acc.is_main_process:
            return
        from vaejob.samples import write_samples

        c = self.cfg.samples
        with self.acc.autocast():
            result = write_samples(
                c.root or self.cfg.run.dir,
                self.step,
                self.unwrapped,
                self.fixed_images.to(self.device),
                n=c.num,
                seed=c.seed,
            )
        if self.cfg.wandb.log_images:
            grids = {"samples": result["samples_grid"], "recon": result.get("recon_grid")}
            self.tracker.log_images(self.step, {k: v for k, v in grids.items() if v is not None})

    def write_final_plots(self) -> None:
        from vaejob.samples import write_final_plots

        loader = self._loader("val", rank=0, world_size=1, num_workers=0)

        def val_batches():
            for batch in loader:
                yield {**batch, "image": batch["image"].float().div_(255.0)}

        images = write_final_plots(
            self.cfg.samples.root or self.cfg.run.dir,
            self.unwrapped,
            val_batches(),
            read_metrics(os.path.join(self.cfg.run.dir, "metrics.jsonl")),
            label_names=(self.shards.manifest.get("labels") or {}).get("names"),
            device=self.device,
        )
        if self.cfg.wandb.log_images:
            self.tracker.log_images(self.step, images)


def _all_max(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def run(cfg: Config) -> dict[str, Any]:
    """Train to ``cfg.train.max_steps`` (or until a stop signal); returns a summary with the exit code."""
    trainer = Trainer(cfg)
    code = trainer.fit()
    val = [r for r in read_metrics(os.path.join(cfg.run.dir, "metrics.jsonl")) if r.get("split") == "val"]
    return {"exit_code": code, "step": trainer.step, "run_dir": cfg.run.dir, "val": val[-1] if val else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vaejob.train",
        description="Train a VAE on a vaejob shard set (run under `accelerate launch` for multi-GPU/multi-node).",
        epilog="Example: accelerate launch vaejob/train.py --config configs/fashion_mnist.yaml train.max_steps=2000",
    )
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not log.handlers:  # our own handler, not the root's: launchers (submitit) keep their logging as is
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s vaejob %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return EXIT_OK
        open_shards(cfg.data.shards, verify=False)  # fail fast, before processes and models start
        summary = run(cfg)
    except (ConfigError, DataError) as e:
        print(f"vaejob.train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if summary["exit_code"] == EXIT_OK and summary["val"] and int(os.environ.get("RANK", "0")) == 0:
        v = summary["val"]
        print(
            json.dumps({"step": summary["step"], "val_nelbo": round(v["nelbo"], 3), "run_dir": cfg.run.dir})
        )
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
