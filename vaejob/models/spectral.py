"""NVAE's spectral regularisation (Vahdat & Kautz 2020, section 3.2): ``loss.spectral_reg`` x the sum over every
conv and linear layer of the largest singular value of its weight (reshaped to out x in*k*k), which bounds how
much each layer can amplify a change of its input: NVAE's cure for its KL blowing up.

The singular values come from power iteration with persistent vectors u, v per layer (buffers: they are part of
the weights file, so a resumed job continues the same iteration), four iterations a training step and forty at
construction, all layers of one weight shape at once (NVAE's ``spectral_norm_parallel``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POWER_ITERATIONS = 4
FIRST_ITERATIONS = 40
_EPS = 1e-3  # NVAE's normalisation epsilon


def _matrix(layer: nn.Module) -> Tensor:
    return layer.weight.reshape(layer.weight.shape[0], -1)


class SpectralNorms(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)]
        by_shape: dict[tuple[int, ...], list[nn.Module]] = {}
        for layer in layers:
            by_shape.setdefault(tuple(_matrix(layer).shape), []).append(layer)
        self._groups = list(by_shape.values())  # a plain list: the layers stay the model's own modules
        for j, group in enumerate(self._groups):
            rows, cols = _matrix(group[0]).shape
            self.register_buffer(f"u{j}", F.normalize(torch.randn(len(group), rows), dim=1, eps=_EPS))
            self.register_buffer(f"v{j}", F.normalize(torch.randn(len(group), cols), dim=1, eps=_EPS))
        self.iterate(FIRST_ITERATIONS)

    def _weights(self, j: int) -> Tensor:
        return torch.stack([_matrix(layer) for layer in self._groups[j]])  # (layers, rows, cols)

    @torch.no_grad()
    def iterate(self, steps: int) -> None:
        """``steps`` power iterations of every layer's (u, v) against its current weight."""
        for j in range(len(self._groups)):
            w, u, v = self._weights(j).float(), getattr(self, f"u{j}"), getattr(self, f"v{j}")
            for _ in range(steps):
                v.copy_(F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=_EPS))
                u.copy_(F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=_EPS))

    def _sigma(self, j: int) -> Tensor:
        """u^T W v of every layer of group j: its largest singular value once (u, v) have converged."""
        u, v = getattr(self, f"u{j}"), getattr(self, f"v{j}")
        return torch.bmm(u.unsqueeze(1), torch.bmm(self._weights(j).float(), v.unsqueeze(2))).flatten()

    def forward(self) -> Tensor:
        """A training step's term: iterate, then the sum over all layers (differentiable in W), fp32."""
        self.iterate(POWER_ITERATIONS)
        return torch.cat([self._sigma(j) for j in range(len(self._groups))]).sum()

    @torch.no_grad()
    def sigmas(self) -> Tensor:
        """The current estimate of every layer's largest singular value (no iteration)."""
        return torch.cat([self._sigma(j) for j in range(len(self._groups))])
