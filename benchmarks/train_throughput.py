"""Training images/s: vaejob's ``Trainer`` loop vs a bare PyTorch loop of the same model, batch and precision.

    python benchmarks/train_throughput.py                          # default config, 30 rounds of 20 steps
    python benchmarks/train_throughput.py --rounds 2 --chunk 20    # quick (CI)
    python benchmarks/train_throughput.py --config configs/fashion_mnist_keras.yaml train.batch_size=256

Both loops run in this process, on the same in-memory uint8 batches (the config's image shape; pixel values do
not change the speed), with the config's threads, batch size, ``channels_last`` and precision:

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
"""

from __future__ import annotations

import argparse
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
from vaejob.loss import vae_loss  # noqa: E402
from vaejob.model import build_model  # noqa: E402
from vaejob.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Batch = dict[str, torch.Tensor]


class MemoryLoader:
    """The part of ``ShardLoader``'s interface the Trainer uses, over batches held in memory. ``between``
    runs (and is excluded from ``stamps``) before every batch handed out whose index is in ``pause_at``."""

    def __init__(self, batches: list[Batch], between: Callable[[], None] | None = None, pause_at=()) -> None:
        self.batches, self.between, self.pause_at = batches, between, set(pause_at)
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

    def __init__(self, cfg: Config, batches: list[Batch]) -> None:
        t = cfg.train
        self.cfg, self.batches, self.i = cfg, batches, 0
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, cfg.loss, tuple(batches[0]["image"].shape[1:]))
        self.model = model.to(memory_format=torch.channels_last) if t.channels_last else model
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay
        )
        self.rates: list[float] = []

    def steps(self, n: int) -> float:
        t = self.cfg.train
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16")
        self.model.train()
        start = time.perf_counter()
        for _ in range(n):
            x = self.batches[self.i % len(self.batches)]["image"].float().div_(255.0)
            self.i += 1
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with bf16:
                logits, mu, logvar = self.model(x)
            out = vae_loss(self.model.likelihood, logits, x, mu, logvar, self.cfg.loss, self.cfg.loss.beta)
            out.loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return n * t.batch_size / (time.perf_counter() - start)


def make_batches(batch_size: int, shape: tuple[int, int, int], n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8, generator=g),
            "label": torch.zeros(batch_size, dtype=torch.long),
            "valid": torch.ones(batch_size, dtype=torch.bool),
        }
        for _ in range(n)
    ]


def small_shards(root: str, shape: tuple[int, int, int]) -> str:
    """The Trainer opens a real shard set (image shape, fixed recon images): a small synthetic one will do."""
    out = os.path.join(root, "shards")
    args = ["--source", "synthetic:1200", "--size", str(shape[1]), "--channels", str(shape[0])]
    if shard.main([*args, "--out", out, "--workers", "1", "--val-fraction", "0.2"]) != 0:
        raise SystemExit("vaejob.shard failed")
    return out


def measure(
    cfg: Config, shape: tuple[int, int, int], warmup: int, chunk: int, rounds: int
) -> dict[str, list]:
    """Runs the interleaved rounds; returns per-chunk images/s of each loop."""
    batches = make_batches(cfg.train.batch_size, shape, 32)
    bare = BareLoop(cfg, batches)
    bare.steps(warmup)
    starts = [warmup + r * chunk for r in range(rounds + 1)]

    def between() -> None:
        if len(bare.rates) < rounds:
            bare.rates.append(bare.steps(chunk))

    # Trainer's own set-up (threads, seed) comes after the bare model's: both see the same settings.
    trainer = Trainer(cfg)
    loader = MemoryLoader(batches, between, pause_at=starts)
    trainer.train_loader = loader
    trainer.val_loader = trainer.validator.loader = MemoryLoader(batches[:1])
    if trainer.fit() != 0:
        raise SystemExit("the Trainer run failed")
    s = loader.stamps
    images = chunk * cfg.train.batch_size
    rates = [images / (s[b][0] - s[a][1]) for a, b in zip(starts, starts[1:], strict=False)]
    return {"bare": bare.rates, "trainer": rates}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist.yaml"))
    p.add_argument("--rounds", type=int, default=30, help="timed chunks per loop")
    p.add_argument("--chunk", type=int, default=20, help="steps per chunk")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (each loop)")
    p.add_argument("--shape", default="1,28,28", help="C,H,W of the images (the default config's data)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        fixed = [
            f"data.shards={small_shards(tmp, shape)}",
            f"run.dir={os.path.join(tmp, 'run')}",
            f"train.max_steps={args.warmup + args.rounds * args.chunk + 1}",
            "samples.final_plots=false",
        ]
        cfg = load_config(args.config, [*args.overrides, *fixed])
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        print(
            f"{cfg.model.name} VAE {shape}, batch {t.batch_size}, precision {t.mixed_precision}, channels_last "
            f"{t.channels_last}, {torch.get_num_threads()} threads; log every {t.log_every}, eval/samples/"
            f"checkpoint every {t.eval_every}/{t.sample_every}/{t.checkpoint_every} steps; "
            f"{args.rounds} x {args.chunk} steps per loop, interleaved",
            flush=True,
        )
        rates = measure(cfg, shape, args.warmup, args.chunk, args.rounds)
    images = args.rounds * args.chunk * t.batch_size
    total = {k: images / sum(t.batch_size * args.chunk / r for r in v) for k, v in rates.items()}
    print(f"\n{'loop':<9}{'img/s':>8}{'median chunk':>14}{'best chunk':>12}")
    for k, v in rates.items():
        print(f"{k:<9}{total[k]:>8.0f}{statistics.median(v):>14.0f}{max(v):>12.0f}")
    ratio = total["trainer"] / total["bare"]
    paired = statistics.median(t / b for t, b in zip(rates["trainer"], rates["bare"], strict=True))
    print(f"\ntrainer / bare = {ratio:.3f} total, {paired:.3f} median per round (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
