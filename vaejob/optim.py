"""The optimizer step: AdamW, the learning-rate schedule, and what happens to a step that is not finite.

Non-finite losses are recorded on the device (no per-step host sync) and checked at log boundaries and
before every checkpoint, so a checkpoint never holds weights trained on a NaN. ``train.on_nonfinite=skip``
drops a step whose (all-reduced, so rank-identical) gradient norm is not finite, up to a cap.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from vaejob.config import TrainConfig


class NonFiniteError(RuntimeError):
    pass


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameters. The fused kernel on CPU and CUDA: one pass over all parameters
    instead of ~10 small ops per tensor (measured 0.2 vs 0.8 ms a step on CPU for the default model, about 5%
    of a batch-32 step); the same update up to float rounding."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(
        params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, fused=fused or None
    )


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at ``max_steps`` (or constant)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class StepGuard:
    """train.on_nonfinite: ``stop`` (raise at the next check, keeping the last good checkpoint) or ``skip``."""

    def __init__(self, t: TrainConfig, device: torch.device, world: int) -> None:
        self.skip, self.max_skipped, self.world = t.on_nonfinite == "skip", t.max_skipped_steps, world
        self.skipped_steps = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def skips(self, grad_norm: torch.Tensor | None, step: int) -> bool:
        """Whether to drop this step's update (skip policy and a non-finite gradient norm)."""
        if not self.skip or grad_norm is None or torch.isfinite(grad_norm):
            return False
        self.skipped_steps += 1
        if self.skipped_steps > self.max_skipped:
            raise NonFiniteError(f"more than {self.max_skipped} non-finite steps (step {step})")
        return True

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Remember the first step whose loss was not finite, on the device (no host sync)."""
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step.copy_(torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step))

    def check(self) -> None:
        """Collective: raise ``NonFiniteError`` on every rank if any rank saw a non-finite loss."""
        bad = self.first_bad_step.clone()
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        first = int(bad)
        if first >= 0:
            raise NonFiniteError(f"non-finite loss at step {first}")
