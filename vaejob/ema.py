"""An exponential moving average (EMA) of the model's weights: what generative models usually sample from.

After every optimizer step ``ema = d · ema + (1 − d) · weights`` with ``d = min(decay, (1 + t) / (10 + t))`` at
update ``t``: the warm-up keeps the randomly initialised weights from lingering in the average (with a fixed
0.999 they would still weigh 6% after 2,800 steps). Buffers (BatchNorm statistics) are copied, not averaged.
Every rank keeps the same average (their weights are identical under DDP), so validation can run on it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), weight)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (safetensors-ready: contiguous CPU tensors)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(tensors, strict=True)
        self.updates = updates
