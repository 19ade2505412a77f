"""One pass over a split that measures a VAE the way training's validation and ``vaejob.evaluate`` both
report it: −ELBO (one z per image, analytic KL), reconstruction, KL (total, per latent group and, for one group,
per dimension), active latent units (total and per group), dead units of a ReLU Dense bottleneck, per-class −ELBO,
plus an optional per-image NLL estimate such as the importance-weighted bound (``iw_log_px``, Burda et al. 2016).
Any model of ``vaejob.models`` (one interface: one latent group or many).

Exact across ranks: padding rows are dropped, per-image values are summed in float64 and all-reduced, so
every sample counts once. The noise of a ``Noise`` source; both callers (training's ``Validator`` and
``vaejob.evaluate``) use ``KeyedNoise``, a generator per (seed, sample key): the numbers do not depend on the
rank count, batch size or device, and the val pass of a checkpoint's step equals ``vaejob.evaluate --seed
train.seed`` on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor

from vaejob.config import LossConfig
from vaejob.loader.batch import Batch, unit_float
from vaejob.loss import LossOut, bits_per_dim, vae_loss
from vaejob.models import VAE
from vaejob.models.base import repeat_features
from vaejob.seeding import item_generator
from vaejob.shards import ShardSet

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: a latent dim is active if Var_x E[z_d|x] > 0.01
IW_CHUNK = 100  # importance samples per image per decoder pass; fixed, as it shapes the noise stream


class Noise(Protocol):
    def draw(self, keys: Sequence[str] | None, n: int, dim: int, device: torch.device) -> Tensor:
        """(n, dim) standard-normal noise, one sample per image of a new batch."""
        ...

    def more(self, c: int, dim: int) -> Tensor:
        """(n, c, dim): the next ``c`` samples of each image of the batch ``draw`` started (IW bounds)."""
        ...


class KeyedNoise:
    """Image ``key``'s noise comes from a CPU generator seeded by (seed, key); ``generators`` keeps the
    current batch's, so further samples of an image (the importance-weighted bound) continue its stream."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generators: list[torch.Generator] = []

    def draw(self, keys: Sequence[str] | None, n: int, dim: int, device: torch.device) -> Tensor:
        if keys is None:
            raise ValueError("KeyedNoise needs the sample keys: make the loader with with_keys=True")
        self.generators = [item_generator(self.seed, k) for k in keys]
        return torch.stack([torch.randn(dim, generator=g) for g in self.generators]).to(device)

    def more(self, c: int, dim: int) -> Tensor:
        return per_image_noise(self.generators)(c, dim)


def per_image_noise(generators: Sequence[torch.Generator]) -> Callable[[int, int], Tensor]:
    """``draw(c, dim) -> (N, c, dim)`` on the CPU: image i's next c samples from ``generators[i]``."""

    def draw(c: int, dim: int) -> Tensor:
        return torch.stack([torch.randn(c, dim, generator=g) for g in generators])

    return draw


def nll_labels(likelihood: str, discrete: bool, binarize: str) -> dict[str, Any]:
    """What a reported −ELBO / IW-NLL is: the likelihood, the run's ``data.binarize`` (a binarised run is
    measured on the static draw) and whether its nats bound −log p(x) of a distribution normalised over the
    measured images: over the 256 levels (``discrete``), or a Bernoulli over binarised pixels. A Bernoulli on
    grey levels is BCE with soft targets, no likelihood: a 0.5-grey pixel decoded exactly scores ln 2."""
    normalized = discrete or (likelihood == "bernoulli" and binarize != "none")
    return {"likelihood": likelihood, "binarize": binarize, "normalized_likelihood": normalized}


class ElboSums:
    """Float64 per-rank sums of a pass (and the max activation of each ReLU bottleneck unit: dead = never
    above 0 on the split), reduced once."""

    SCALARS = ("count", "recon", "kl", "nelbo", "nll")

    def __init__(
        self, latent_groups: Sequence[int], num_classes: int, hidden_units: int, device: torch.device
    ) -> None:
        z = dict(dtype=torch.float64, device=device)
        self.groups = list(latent_groups)
        self.scalars = torch.zeros(len(self.SCALARS), **z)
        self.kl_dim, self.mu, self.mu_sq = (torch.zeros(sum(self.groups), **z) for _ in range(3))
        self.class_nelbo, self.class_count = torch.zeros(num_classes, **z), torch.zeros(num_classes, **z)
        self.hidden_max = torch.full((hidden_units,), -torch.inf, device=device) if hidden_units else None
        self.has_nll = False

    def add(
        self, out: LossOut, mu: Tensor, labels: Tensor, hidden: Tensor | None, nll: Tensor | None
    ) -> None:
        nelbo = out.recon.double() + out.kl.double()  # in float64: the reported -ELBO is recon + KL exactly
        zero = torch.zeros_like(nelbo)
        per_image = (
            torch.ones_like(nelbo),
            out.recon.double(),
            out.kl.double(),
            nelbo,
            zero if nll is None else nll,
        )
        self.scalars += torch.stack([v.sum() for v in per_image])
        self.has_nll = nll is not None
        self.kl_dim += out.kl_per_dim.double().sum(0)
        self.mu += mu.double().sum(0)
        self.mu_sq += mu.double().pow(2).sum(0)
        labelled = labels >= 0
        if len(self.class_count) and labelled.any():
            self.class_nelbo.index_add_(0, labels[labelled], nelbo[labelled])
            self.class_count.index_add_(0, labels[labelled], torch.ones_like(nelbo[labelled]))
        if self.hidden_max is not None and hidden is not None:
            self.hidden_max = torch.maximum(self.hidden_max, hidden.float().amax(0))

    def _parts(self) -> list[Tensor]:
        return [self.scalars, self.kl_dim, self.mu, self.mu_sq, self.class_nelbo, self.class_count]

    def reduce(self, acc: Accelerator) -> None:
        """Collective: sums over all ranks (one all-reduce), and the bottleneck maxima (a second)."""
        flat = acc.reduce(torch.cat(self._parts()), reduction="sum")
        for part, new in zip(self._parts(), flat.split([p.numel() for p in self._parts()]), strict=True):
            part.copy_(new)
        if self.hidden_max is not None and acc.num_processes > 1:
            dist.all_reduce(self.hidden_max, op=dist.ReduceOp.MAX)

    def result(
        self, image_shape: tuple[int, int, int], label_names: Sequence[str] | None, discrete: bool
    ) -> dict[str, Any]:
        """The pass's metrics. Bits/dim only for a likelihood over the 256 levels (``discrete``): of any other
        they would not be comparable with anything."""
        totals = dict(zip(self.SCALARS, self.scalars.tolist(), strict=True))
        n = totals["count"]
        mean = {key: totals[key] / n for key in self.SCALARS[1:]}
        var = self.mu_sq / n - (self.mu / n) ** 2
        active = (var > ACTIVE_UNIT_THRESHOLD).split(self.groups)
        record: dict[str, Any] = {
            "count": int(n),
            "nelbo": mean["nelbo"],
            "recon": mean["recon"],
            "kl": mean["kl"],
            "active_units": int((var > ACTIVE_UNIT_THRESHOLD).sum().item()),
            "latent_dim": len(var),
        }
        if len(self.groups) == 1:
            record["kl_per_dim"] = (self.kl_dim / n).tolist()
        else:  # a hierarchical model: thousands of units, reported per group
            record["active_units_per_group"] = [int(a.sum().item()) for a in active]
            record["latent_groups"] = self.groups
            record["kl_per_group"] = [float(k.sum().item()) / n for k in self.kl_dim.split(self.groups)]
        if discrete:
            record["nelbo_bits_per_dim"] = bits_per_dim(mean["nelbo"], image_shape)
        if self.has_nll:
            record["iw_nll"] = mean["nll"]
            if discrete:
                record["bits_per_dim"] = bits_per_dim(mean["nll"], image_shape)
        if self.hidden_max is not None:
            record["dead_hidden_units"] = int((self.hidden_max <= 0).sum().item())
            record["hidden_units"] = int(self.hidden_max.numel())
        counts = self.class_count.tolist()
        if any(counts):
            names = label_names or [str(c) for c in range(len(counts))]
            record["per_class"] = {
                str(name): {"count": int(c), "nelbo": s / c}
                for name, c, s in zip(names, counts, self.class_nelbo.tolist(), strict=True)
                if c
            }
        return record


@torch.no_grad()
def iw_log_px(
    model: VAE,
    x: Tensor,
    k: int,
    *,
    noise: Callable[[int, int], Tensor],
    chunk: int = IW_CHUNK,
) -> Tensor:
    """Importance-weighted estimate of log p(x) per image, float64 (N,) nats:
    ``logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log k`` with z_k ~ q(z|x) over all latent groups.

    ``x`` is N×C×H×W in [0, 1]; p(x|z) is the model's likelihood as evaluation reports it; ``noise(c, D)`` gives
    the next ``c`` standard-normal samples of every image, (N, c, D) (``per_image_noise``: one CPU generator per
    image), so the result is a function of (model, x, noise, k, chunk). The encoder runs once; its features are
    repeated for ``chunk`` samples at a time, so memory holds N×chunk decoded images; densities are fp32 and the
    log-sum-exp runs over chunks in float64.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"need k >= 1 and chunk >= 1 (got {k}, {chunk})")
    features = model.bottom_up(x)
    n, d = len(x), model.latent_size
    total = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        eps = noise(c, d).to(x.device)  # (N, c, D)
        if eps.shape != (n, c, d):
            raise ValueError(f"noise gave {tuple(eps.shape)} for {n} images x {c} samples x {d} units")
        out = model.top_down(repeat_features(features, c), eps.reshape(n * c, d))
        log_px_z = -model.likelihood.eval_nll(out.params, x.repeat_interleave(c, 0))
        log_w = (log_px_z + out.log_p - out.log_q).double().view(n, c)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=1))
    return total - math.log(k)


# An extra per-image measurement on a batch's valid inputs: f(model, x) -> (N,) float64 NLL in nats.
NllFn = Callable[[VAE, Tensor], Tensor]


@torch.no_grad()
def elbo_pass(
    acc: Accelerator,
    model: VAE,
    batches: Iterable[Batch],
    loss_cfg: LossConfig,
    noise: Noise,
    num_classes: int,
    *,
    to_input: Callable[[Tensor], Tensor] | None = None,
    nll: NllFn | None = None,
    on_images: Callable[[Tensor], None] | None = None,
) -> ElboSums:
    """Collective. Sums over every valid image of ``batches`` (this rank's part of the split), reduced.
    ``to_input`` maps a batch's images (uint8 or float) to model inputs on the device; ``on_images`` sees
    each batch's valid inputs (e.g. to keep the first few for figures)."""
    device = acc.device
    to_input = to_input or (lambda images: unit_float(images.to(device, non_blocking=True)))
    sums = ElboSums(model.latent_groups, num_classes, model.hidden_units, device)
    for batch in batches:
        keep = batch["valid"].nonzero().flatten()
        if len(keep) == 0:
            continue
        x = to_input(batch["image"][keep.to(batch["image"].device)])  # a binarised batch is on the device
        labels = batch["label"][keep].to(device)
        keys = [batch["key"][i] for i in keep.tolist()] if "key" in batch else None
        if on_images is not None:
            on_images(x)
        with acc.autocast():
            features = model.bottom_up(x)
            out = model.top_down(features, noise.draw(keys, len(x), model.latent_size, device))
            image_nll = nll(model, x) if nll is not None else None
        loss = vae_loss(model.likelihood, out, x, loss_cfg, 1.0, evaluate=True)
        sums.add(loss, out.mean, labels, out.hidden, image_nll)
    sums.reduce(acc)
    return sums


class Validator:
    """Training's validation cadence: an exact pass over the whole val split every ``eval_every`` steps
    (``loader`` made ``with_keys``: the noise is keyed by sample)."""

    def __init__(
        self,
        acc: Accelerator,
        loader: Any,
        loss_cfg: LossConfig,
        seed: int,
        every: int,
        to_input: Callable[[Tensor], Tensor],
        shards: ShardSet,
        binarize: str = "none",
    ) -> None:
        self.acc, self.loader, self.loss_cfg, self.seed, self.every = acc, loader, loss_cfg, seed, every
        self.to_input, self.shards, self.binarize = to_input, shards, binarize

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def run(self, model: VAE, step: int) -> dict[str, Any]:
        """Collective: the val record of ``step`` (as training logs it to metrics.jsonl and W&B)."""
        was_training = model.training
        model.eval()
        self.loader.set_epoch(0)
        # Each image's z noise from (seed, key): the same at every evaluation and for any world or batch size.
        noise = KeyedNoise(self.seed)
        k = self.loss_cfg.iw_samples

        def iwae_nll(model: VAE, x: Tensor) -> Tensor:  # the bound an IWAE objective trains on
            return -iw_log_px(model, x, k, noise=noise.more)

        sums = elbo_pass(
            self.acc,
            model,
            self.loader,
            self.loss_cfg,
            noise,
            self.shards.num_classes,
            to_input=self.to_input,
            nll=iwae_nll if k > 1 else None,
        )
        if was_training:
            model.train()
        skipped = 0
        if self.shards.indexed:  # undecodable images of foreign tars (vaejob's own sets stop on one)
            mine = torch.tensor(self.loader.last_epoch_skipped, device=self.acc.device)
            skipped = int(self.acc.reduce(mine, reduction="sum"))
        discrete = model.likelihood.discrete
        r = sums.result(model.image_shape, self.shards.label_names, discrete)
        record = {
            "step": step,
            "split": "val",
            "loss": r["nelbo"],
            "nelbo": r["nelbo"],
            "recon": r["recon"],
            "kl": r["kl"],
            "active_units": r["active_units"],
            "count": r["count"],
            **nll_labels(self.loss_cfg.likelihood, discrete, self.binarize),
        }
        if "nelbo_bits_per_dim" in r:
            record["bits_per_dim"] = r["nelbo_bits_per_dim"]
        if "iw_nll" in r:
            record.update(iw_nll=r["iw_nll"], iw_samples=k)
        for key in ("active_units_per_group", "kl_per_group", "dead_hidden_units", "hidden_units"):
            if key in r:
                record[key] = r[key]
        if skipped:  # undecodable images of an indexed set: not in count, each good one counted once
            record["skipped_samples"] = skipped
        record["time"] = time.time()
        return record
