"""Training images/s: vaejob's ``Trainer`` loop vs a bare PyTorch loop of the same model, batch and precision.

    python benchmarks/train_throughput.py                          # default config, 30 rounds of 20 steps
    python benchmarks/train_throughput.py --rounds 2 --chunk 20    # quick (CI)
    python benchmarks/train_throughput.py --config configs/fashion_mnist_keras.yaml train.batch_size=256
    python benchmarks/train_throughput.py --batch-sizes 32,256,1024 --json out.json   # one row per batch size

Both loops run in this process, on the same in-memory uint8 batches (the config's image shape; pixel values do
not change the speed), with the config's threads, batch size, ``channels_last`` and precision (``auto`` values
resolved for this machine, as the job does), on the device the job would use (CUDA when there is one):

  bare      to device -> float/255 -> VAE -> vae_loss -> backward -> AdamW step, nothing else
  trainer   the real ``vaejob.train.Trainer.fit()``: LR schedule, non-finite checks, log windows, metrics.jsonl
            and W&B (offline) records, tqdm, and checkpoints, samples and evaluation at the config's cadence.
            Its train loader is an in-memory one with the ShardLoader interface and its val loader holds one
            batch (a full evaluation is not a training-step cost; ``time_to_quality.py`` times the whole job).

Interleaved at a fine grain, so machine noise hits both alike: the in-memory loader runs ``--chunk`` bare steps
(a second model and optimizer) each time the trainer has done ``--chunk`` steps, outside the trainer's timed
intervals. A trainer interval runs from handing out one chunk's first batch to handing out the next chunk's
first batch, so every cadence event inside it (log, eval, samples, checkpoint) is paid. Start-up, the final
step and the final plots are outside. Prints the median and best chunk, the ratio of total rates and the median
of the per-round ratios (each trainer chunk over the bare chunk run just before it: steadier on a noisy box).
On CUDA every interval ends with a device synchronisation, and the peak GPU memory of the batch size is reported
(both loops' weights and optimizer states, one step's activations at a time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaejob import shard  # noqa: E402
from vaejob.config import Config, load_config  # noqa: E402
from vaejob.device import job_uses_cuda, resolve_auto  # noqa: E402
from vaejob.loss import vae_loss  # noqa: E402
from vaejob.models import build_model  # noqa: E402
from vaejob.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Batch = dict[str, torch.Tensor]


def device_sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryLoader:
    """The part of ``ShardLoader``'s interface the Trainer uses, over batches held in memory. ``between``
    runs (and is excluded from ``stamps``) before every batch handed out whose index is in ``pause_at``, after
    ``sync`` (the trainer's queued device work belongs to its own interval)."""

    def __init__(
        self,
        batches: list[Batch],
        between: Callable[[], None] | None = None,
        pause_at=(),
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        self.batches, self.between, self.pause_at, self.sync = batches, between, set(pause_at), sync
        self.epoch = self.batch = self.served = 0
        self.stamps: dict[int, tuple[float, float]] = {}  # batch index -> (before between(), after)

    @property
    def num_samples(self) -> int:
        return sum(len(b["image"]) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        for b in self.batches[self.batch :]:
            if self.served in self.pause_at:
                self.sync()
                before = time.perf_counter()
                if self.between is not None:
                    self.between()
                self.stamps[self.served] = (before, time.perf_counter())
            self.batch += 1
            self.served += 1
            yield b
        self.epoch, self.batch = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def close(self) -> None:
        pass


class BareLoop:
    """The same model, optimizer, batch and precision as the job, and nothing else."""

    def __init__(self, cfg: Config, batches: list[Batch], device: torch.device) -> None:
        t = cfg.train
        self.cfg, self.batches, self.i, self.device = cfg, batches, 0, device
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, cfg.loss, tuple(batches[0]["image"].shape[1:])).to(device)
        self.model = model.to(memory_format=torch.channels_last) if t.channels_last else model
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay
        )
        # What accelerate does: bf16 autocast on any device, fp16 (with a GradScaler) only on CUDA.
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
        self.autocast_dtype = None if half is torch.float16 and device.type != "cuda" else half
        self.scaler = torch.amp.GradScaler(device.type) if self.autocast_dtype is torch.float16 else None
        self.rates: list[float] = []

    def steps(self, n: int) -> float:
        t = self.cfg.train
        amp = torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )
        self.model.train()
        start = time.perf_counter()
        for _ in range(n):
            images = self.batches[self.i % len(self.batches)]["image"]
            x = images.to(self.device, non_blocking=True).float().div_(255.0)
            self.i += 1
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                model_out = self.model(x)
            out = vae_loss(self.model.likelihood, model_out, x, self.cfg.loss, self.cfg.loss.beta)
            if self.scaler is not None:
                self.scaler.scale(out.loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                out.loss.backward()
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        device_sync(self.device)
        return n * t.batch_size / (time.perf_counter() - start)


def make_batches(batch_size: int, shape: tuple[int, int, int], n: int, pin: bool = False) -> list[Batch]:
    """``n`` uint8 batches; ``pin``: in page-locked memory, as the job's loader hands them to a GPU."""
    g = torch.Generator().manual_seed(0)

    def images() -> torch.Tensor:
        x = torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8, generator=g)
        return x.pin_memory() if pin else x

    return [
        {
            "image": images(),
            "label": torch.zeros(batch_size, dtype=torch.long),
            "valid": torch.ones(batch_size, dtype=torch.bool),
            "key": [f"{b:04d}-{i:05d}" for i in range(batch_size)],  # validation's noise is keyed by sample
        }
        for b in range(n)
    ]


def small_shards(root: str, shape: tuple[int, int, int], num: int = 1200) -> str:
    """The Trainer opens a real shard set (image shape, fixed recon images): a small synthetic one will do."""
    out = os.path.join(root, "shards")
    args = ["--source", f"synthetic:{num}", "--size", str(shape[1]), "--channels", str(shape[0])]
    if shard.main([*args, "--out", out, "--workers", "1", "--val-fraction", "0.2"]) != 0:
        raise SystemExit("vaejob.shard failed")
    return out


def measure(
    cfg: Config, shape: tuple[int, int, int], warmup: int, chunk: int, rounds: int
) -> dict[str, list]:
    """Runs the interleaved rounds; returns per-chunk images/s of each loop."""
    cfg, _ = resolve_auto(cfg)  # the bare loop follows the precision the Trainer resolves
    device = torch.device("cuda" if job_uses_cuda() else "cpu")
    batches = make_batches(
        cfg.train.batch_size, shape, 32 if cfg.train.batch_size <= 256 else 8, device.type == "cuda"
    )
    bare = BareLoop(cfg, batches, device)
    bare.steps(warmup)
    starts = [warmup + r * chunk for r in range(rounds + 1)]

    def between() -> None:
        if len(bare.rates) < rounds:
            bare.rates.append(bare.steps(chunk))

    # Trainer's own set-up (threads, seed) comes after the bare model's: both see the same settings.
    trainer = Trainer(cfg)
    loader = MemoryLoader(batches, between, pause_at=starts, sync=lambda: device_sync(device))
    trainer.train_loader = loader
    trainer.val_loader = trainer.validator.loader = MemoryLoader(batches[:1])
    if trainer.fit() != 0:
        raise SystemExit("the Trainer run failed")
    s = loader.stamps
    images = chunk * cfg.train.batch_size
    rates = [images / (s[b][0] - s[a][1]) for a, b in zip(starts, starts[1:], strict=False)]
    return {"bare": bare.rates, "trainer": rates}


def summarize(rates: dict[str, list[float]]) -> dict[str, float]:
    """Total img/s of each loop (all chunks are the same size), and trainer / bare as total and median ratio."""
    total = {k: len(v) / sum(1 / r for r in v) for k, v in rates.items()}
    paired = statistics.median(t / b for t, b in zip(rates["trainer"], rates["bare"], strict=True))
    return {**total, "ratio": total["trainer"] / total["bare"], "paired": paired}


def report(rates: dict[str, list[float]]) -> dict[str, float]:
    summary = summarize(rates)
    print(f"\n{'loop':<9}{'img/s':>8}{'median chunk':>14}{'best chunk':>12}")
    for k, v in rates.items():
        print(f"{k:<9}{summary[k]:>8.0f}{statistics.median(v):>14.0f}{max(v):>12.0f}")
    print(
        f"\ntrainer / bare = {summary['ratio']:.3f} total, {summary['paired']:.3f} median per round "
        "(target >= 0.95)",
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist.yaml"))
    p.add_argument("--rounds", type=int, default=30, help="timed chunks per loop")
    p.add_argument("--chunk", type=int, default=20, help="steps per chunk")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (each loop)")
    p.add_argument("--shape", default="1,28,28", help="C,H,W of the images (the default config's data)")
    p.add_argument("--batch-sizes", help="comma-separated per-process batch sizes, each measured in turn")
    p.add_argument("--json", help="write one record per batch size here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
    shape = tuple(int(v) for v in args.shape.split(","))
    records: list[dict[str, Any]] = []
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [None]
    largest = max([b for b in sizes if b] or [load_config(args.config, args.overrides).train.batch_size])
    with tempfile.TemporaryDirectory() as tmp:
        # the Trainer refuses a train split smaller than one batch; 80% of the images are train
        shards = small_shards(tmp, shape, max(1200, 2 * largest))
        for size in sizes:
            fixed = [
                f"data.shards={shards}",
                f"run.dir={os.path.join(tmp, f'run-{size}')}",
                f"train.max_steps={args.warmup + args.rounds * args.chunk + 1}",
                "samples.final_plots=false",
                *([f"train.batch_size={size}"] if size else []),
            ]
            cfg, _ = resolve_auto(load_config(args.config, [*args.overrides, *fixed]))
            t = cfg.train
            if t.num_threads:
                torch.set_num_threads(t.num_threads)
            device = "cuda" if job_uses_cuda() else "cpu"
            print(
                f"{cfg.model.name} VAE {shape}, batch {t.batch_size}, precision {t.mixed_precision}, "
                f"channels_last {t.channels_last}, compile {t.compile}, on {device} "
                f"({torch.get_num_threads()} threads); log every {t.log_every}, eval/samples/checkpoint every "
                f"{t.eval_every}/{t.sample_every}/{t.checkpoint_every} steps; "
                f"{args.rounds} x {args.chunk} steps per loop, interleaved",
                flush=True,
            )
            record: dict[str, Any] = {"batch_size": t.batch_size, "mixed_precision": t.mixed_precision}
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                record.update(report(measure(cfg, shape, args.warmup, args.chunk, args.rounds)))
            except torch.cuda.OutOfMemoryError:
                record["error"] = "out of memory"
                print(f"batch {t.batch_size}: out of memory; larger batch sizes skipped", flush=True)
            if device == "cuda":
                record["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.empty_cache()
            records.append(record)
            if args.json:  # after every batch size: a run stopped midway keeps what it measured
                Path(args.json).write_text(json.dumps(records, indent=1))
            if "error" in record:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
