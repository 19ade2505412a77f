"""The figures of a run: sample grids and reconstructions during training, diagnostic plots at the end,
latent traversals and interpolations for evaluation; written through :mod:`vaejob.storage`.

Runs on rank 0 with the unwrapped model (``vaejob.models``' interface): ``image_shape`` (C, H, W),
``latent_size``, ``generate(eps, temperature)``, ``forward(x, eps)`` and ``mean_image(params) -> [0, 1] images``
serve every family. What needs one latent vector (``single_latent``: ``encode(x) -> (mu, logvar)``,
``decode(z)``): the latent scatter, the 2-D manifold, interpolations and traversals; for a hierarchical model they
are skipped, and the final plots say so in one log line.
Every function here puts the model in eval mode under ``torch.inference_mode`` and restores each module's
previous mode afterwards; random latents come from a private CPU ``torch.Generator``, so the global RNG
streams are untouched and the same seed gives the same latents on every device and at every step.

``samples/step_XXXXXXXX/`` holds ``samples.png``, ``samples.npy`` (uint8 N×H×W×C), ``recon.png`` and
``meta.json``, written last: a directory with ``meta.json`` is complete.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaejob import plots, storage
from vaejob.cli import LOG_NAME
from vaejob.config import SamplesConfig
from vaejob.loader.batch import unit_float
from vaejob.rundir import step_dir_name
from vaejob.tracking import Tracker

log = logging.getLogger(LOG_NAME)

SAMPLES_FORMAT = "vaejob-samples/1"
RECON_NROW = 8
INTERP_PAIRS = 8
INTERP_STEPS = 10
TRAVERSAL_SPAN = 3.0
TRAVERSAL_STEPS = 11
DECODE_BATCH = 256
TEMPERATURES = (0.4, 0.6, 0.8, 1.0)  # rows of plots/temperatures.png (VDVAE shows samples at t < 1 too)


def to_uint8_nhwc(x: Tensor) -> np.ndarray:
    """N×C×H×W images in [0, 1] (clamped) -> uint8 N×H×W×C numpy array on the CPU."""
    if x.ndim != 4:
        raise ValueError(f"expected N×C×H×W images, got shape {tuple(x.shape)}")
    u8 = x.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _placement(model: torch.nn.Module, device: torch.device | str | None) -> tuple[torch.device, torch.dtype]:
    """Device for inputs (``device`` or the parameters') and the parameters' floating dtype."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    return torch.device(device), dtype


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode + inference mode; restores every submodule's own ``training`` flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _decode_images(model: torch.nn.Module, z: Tensor) -> Tensor:
    return model.mean_image(model.decode(z)).float()


def decode_latents(model: torch.nn.Module, z: Tensor, device: torch.device | str | None = None) -> Tensor:
    """Mean images of prior samples from noise already scaled by the temperature, ``z`` (N, latent_size): a
    single latent's z itself (what ``vaejob.fid`` draws), every group's noise of a hierarchical model."""
    return generate_from(model, z, 1.0, device)


def _check_shape(model: torch.nn.Module, images: Tensor, what: str) -> None:
    if tuple(images.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"{what} have shape {tuple(images.shape[1:])}, model expects {model.image_shape}")


def generate_from(
    model: torch.nn.Module, eps: Tensor, temperature: float = 1.0, device: torch.device | str | None = None
) -> Tensor:
    """Mean images (N×C×H×W in [0, 1]) of prior samples with standard-normal noise ``eps`` (N, latent_size),
    each latent group's noise scaled by ``temperature``."""
    dev, dtype = _placement(model, device)
    with _evaluating(model):
        return model.mean_image(model.generate(eps.to(dev, dtype), temperature)).float()


def generate(
    model: torch.nn.Module,
    n: int,
    seed: int,
    device: torch.device | str | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Decode ``n`` prior samples at ``temperature`` drawn from ``seed``; mean images (N×C×H×W, [0, 1]).

    The noise is drawn on the CPU with a private generator and then moved, so a seed gives the same samples
    on any device and the global RNG state is not touched.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return generate_from(model, torch.randn(n, model.latent_size, generator=gen), temperature, device)


def reconstruct(model: torch.nn.Module, x: Tensor, device: torch.device | str | None = None) -> Tensor:
    """Deterministic reconstructions of images ``x`` (N×C×H×W in [0, 1]) as mean images: z at the posterior
    means (every group's, top-down), decoded."""
    dev, dtype = _placement(model, device)
    with _evaluating(model):
        x = unit_float(x).to(dev, dtype)
        eps = torch.zeros(len(x), model.latent_size, device=dev)
        return model.mean_image(model(x, eps=eps).params).float()


def temperature_grid(
    model: torch.nn.Module, seed: int, n: int = 8, device: torch.device | str | None = None
) -> np.ndarray:
    """One row of ``n`` samples per temperature in ``TEMPERATURES``, the same noise in each column."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(n, model.latent_size, generator=gen)
    rows = [to_uint8_nhwc(generate_from(model, eps, t, device)) for t in TEMPERATURES]
    return plots.make_grid(np.concatenate(rows), n)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_samples(
    root: str,
    step: int,
    model: torch.nn.Module,
    fixed_images: Tensor | None,
    *,
    n: int = 64,
    seed: int = 0,
    temperature: float = 1.0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Write ``root/samples/step_XXXXXXXX/`` and return what was written, for W&B.

    Files: ``samples.png`` (grid of ``n`` samples from the fixed ``seed``), ``samples.npy`` (their uint8
    N×H×W×C array), ``recon.png`` (rows of ``fixed_images`` over their reconstructions; skipped when
    ``fixed_images`` is None or empty) and ``meta.json`` last. Returns ``dir``, ``meta``, ``samples``
    (uint8 N×H×W×C), ``samples_grid`` / ``samples_png`` and, when written, ``recon_grid`` / ``recon_png``
    (grids are uint8 H×W×C, PNGs bytes).
    """
    out_dir = storage.join(root, "samples", step_dir_name(step))
    samples = to_uint8_nhwc(generate(model, n, seed, device, temperature))
    samples_grid = plots.make_grid(samples, nrow=math.ceil(math.sqrt(n)))
    samples_png = plots.to_png(samples_grid)
    storage.atomic_write_bytes(storage.join(out_dir, "samples.png"), samples_png)
    storage.atomic_write_bytes(storage.join(out_dir, "samples.npy"), _npy_bytes(samples))
    files = ["samples.png", "samples.npy"]
    result: dict[str, Any] = {"samples": samples, "samples_grid": samples_grid, "samples_png": samples_png}

    num_recon = 0 if fixed_images is None else len(fixed_images)
    if fixed_images is not None and num_recon:
        _check_shape(model, fixed_images, "fixed_images")
        originals = to_uint8_nhwc(unit_float(fixed_images))
        recons = to_uint8_nhwc(reconstruct(model, fixed_images, device))
        recon_grid = plots.recon_grid(originals, recons, nrow=min(RECON_NROW, num_recon))
        recon_png = plots.to_png(recon_grid)
        storage.atomic_write_bytes(storage.join(out_dir, "recon.png"), recon_png)
        files.append("recon.png")
        result.update(recon_grid=recon_grid, recon_png=recon_png)

    channels, height, width = model.image_shape
    meta = {
        "format": SAMPLES_FORMAT,
        "step": int(step),
        "n": int(n),
        "seed": int(seed),
        "temperature": float(temperature),
        "image": {"channels": channels, "height": height, "width": width},
        "latent_dim": int(model.latent_size),
        "num_recon": num_recon,
        "files": files,
    }
    storage.atomic_write_json(storage.join(out_dir, "meta.json"), meta)
    result.update(dir=out_dir, meta=meta)
    return result


def _encode_val(
    model: torch.nn.Module,
    val_batches: Iterable[Mapping[str, Tensor]],
    max_points: int,
    keep_images: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Posterior means and labels of up to ``max_points`` valid val images, plus the first ``keep_images``
    of those images. Stops pulling batches as soon as ``max_points`` is reached."""
    mus: list[Tensor] = []
    labels: list[Tensor] = []
    kept: list[Tensor] = []
    count = num_kept = 0
    for batch in val_batches if max_points > 0 else ():
        images = batch["image"]
        size = len(images)
        valid = batch.get("valid", torch.ones(size, dtype=torch.bool)).to("cpu", torch.bool)
        label = batch.get("label", torch.full((size,), -1, dtype=torch.int64)).to("cpu", torch.int64)
        index = valid.nonzero().flatten()[: max_points - count]
        if len(index) == 0:
            continue
        chosen = unit_float(images[index.to(images.device)])
        _check_shape(model, chosen, "val images")
        mu, _ = model.encode(chosen.to(device, dtype))
        mus.append(mu.float().cpu())
        labels.append(label[index])
        if num_kept < keep_images:
            kept.append(chosen[: keep_images - num_kept].cpu())
            num_kept += len(kept[-1])
        count += len(index)
        if count >= max_points:
            break
    if not mus:
        empty = torch.zeros(0)
        return empty.reshape(0, model.latent_size), empty.long(), empty.reshape(0, *model.image_shape)
    return torch.cat(mus), torch.cat(labels), torch.cat(kept)


def _numpy_decoder(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> Callable[[np.ndarray], np.ndarray]:
    def decode(z: np.ndarray) -> np.ndarray:
        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
        chunks = [
            to_uint8_nhwc(_decode_images(model, part.to(device, dtype))) for part in zt.split(DECODE_BATCH)
        ]
        return np.concatenate(chunks)

    return decode


def _interpolation(
    model: torch.nn.Module, mu: Tensor, images: Tensor, device: torch.device, dtype: torch.dtype
) -> np.ndarray:
    """Rows of decode((1 - t) mu_a + t mu_b), t = 0 ... 1, for consecutive pairs of val images, with the
    two real images at the ends of each row."""
    pairs = min(INTERP_PAIRS, len(images) // 2)
    mu_a, mu_b = mu[0 : 2 * pairs : 2], mu[1 : 2 * pairs : 2]
    t = torch.linspace(0.0, 1.0, INTERP_STEPS).view(1, -1, 1)
    z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]
    frames = _numpy_decoder(model, device, dtype)(z.reshape(-1, model.latent_dim).numpy())
    frames = frames.reshape(pairs, INTERP_STEPS, *frames.shape[1:])
    ends = to_uint8_nhwc(images[: 2 * pairs]).reshape(pairs, 2, *frames.shape[2:])
    return plots.interpolation_strip(frames, ends)


def interpolation_grid(
    model: torch.nn.Module, images: Tensor, device: torch.device | str | None = None
) -> np.ndarray:
    """Interpolation rows (uint8 grid, as in ``write_final_plots``) between consecutive pairs of ``images``
    (N×C×H×W, N >= 2, float in [0, 1] or uint8)."""
    dev, dtype = _placement(model, device)
    x = unit_float(images).cpu()
    _check_shape(model, x, "images")
    with _evaluating(model):
        mu, _ = model.encode(x.to(dev, dtype))
        return _interpolation(model, mu.float().cpu(), x, dev, dtype)


def latent_traversal(
    model: torch.nn.Module,
    image: Tensor,
    dims: Sequence[int],
    *,
    span: float = TRAVERSAL_SPAN,
    steps: int = TRAVERSAL_STEPS,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """A uint8 grid with one row per latent dimension ``d`` in ``dims``: decode(mu(image) + v e_d) for
    ``steps`` values v from -span to span (the other dimensions stay at the image's posterior mean)."""
    dev, dtype = _placement(model, device)
    x = unit_float(image[None]).cpu()
    _check_shape(model, x, "image")
    with _evaluating(model):
        mu, _ = model.encode(x.to(dev, dtype))
        z = mu.float().cpu().repeat(len(dims), steps, 1)  # (rows, steps, D)
        offsets = torch.linspace(-span, span, steps)
        for row, d in enumerate(dims):
            z[row, :, d] += offsets
        frames = _numpy_decoder(model, dev, dtype)(z.reshape(-1, model.latent_dim).numpy())
    return plots.make_grid(frames, steps)


def write_final_plots(
    root: str,
    model: torch.nn.Module,
    val_batches: Iterable[Mapping[str, Tensor]],
    records: Sequence[Mapping[str, Any]],
    *,
    label_names: Sequence[str] | None = None,
    max_points: int = 5000,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Write the end-of-training figures under ``root/plots/`` and return them as uint8 H×W×C arrays.

    ``val_batches`` yields loader dicts (``image`` N×C×H×W in [0, 1] or uint8, ``label`` int64 with -1 =
    none, ``valid`` bool); invalid rows are skipped and iteration stops once ``max_points`` images are
    encoded, so pass an iterable that may be abandoned part-way. ``records`` are metrics.jsonl events.
    Files (and keys): ``loss_curves.png``, ``temperatures.png``; for a model with one latent vector also
    ``latent_scatter.png`` and ``interpolation.png`` (when there are at least 1 and 2 val images) and
    ``manifold.png`` (only when ``latent_dim == 2``).
    """
    plots_dir = storage.join(root, "plots")
    dev, dtype = _placement(model, device)
    figures: dict[str, bytes] = {"loss_curves": plots.loss_curves(records)}
    grids: dict[str, np.ndarray] = {"temperatures": temperature_grid(model, seed=0, device=device)}
    if not model.single_latent:
        log.info(
            "plots: latent_scatter, manifold and interpolation skipped: they need one latent vector and "
            f"this model has {len(model.latent_groups)} latent groups"
        )
        val_batches = ()
    with _evaluating(model):
        mu, labels, images = _encode_val(model, val_batches, max_points, 2 * INTERP_PAIRS, dev, dtype)
        if len(mu):
            has_labels = bool((labels >= 0).any())
            figures["latent_scatter"] = plots.latent_scatter(
                mu.numpy(), labels.numpy() if has_labels else None, label_names
            )
        if model.single_latent and model.latent_dim == 2:
            grids["manifold"] = plots.manifold_grid(_numpy_decoder(model, dev, dtype))
        if len(images) >= 2:
            grids["interpolation"] = _interpolation(model, mu, images, dev, dtype)
    out: dict[str, np.ndarray] = {}
    for name, png in figures.items():
        storage.atomic_write_bytes(storage.join(plots_dir, f"{name}.png"), png)
        out[name] = plots.png_to_array(png)
    for name, grid in grids.items():
        storage.atomic_write_bytes(storage.join(plots_dir, f"{name}.png"), plots.to_png(grid))
        out[name] = grid
    return out


def first_images(batches: Iterable[Mapping[str, Tensor]], n: int) -> Tensor:
    """The first ``n`` valid images of ``batches`` as floats in [0, 1] (the fixed reconstruction images)."""
    images: list[Tensor] = []
    for batch in batches:
        images.append(batch["image"][batch["valid"]])
        if sum(len(i) for i in images) >= n:
            break
    return unit_float(torch.cat(images)[:n])


class TrainingFigures:
    """Rank 0's figures of a training run: samples and reconstructions every ``sample_every`` steps, the
    final plots at the end; each also goes to W&B when ``wandb.log_images``."""

    def __init__(
        self,
        cfg: SamplesConfig,
        root: str,
        every: int,
        tracker: Tracker,
        fixed_images: Tensor | None,
        log_images: bool,
        label_names: Sequence[str] | None,
    ) -> None:
        self.cfg, self.root, self.every, self.tracker = cfg, root, every, tracker
        self.fixed_images, self.log_images, self.label_names = fixed_images, log_images, label_names

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def write_samples(self, model: torch.nn.Module, step: int, device: torch.device) -> None:
        fixed = self.fixed_images.to(device) if self.fixed_images is not None else None
        result = write_samples(
            self.root, step, model, fixed, n=self.cfg.num, seed=self.cfg.seed, device=device
        )
        if self.log_images:
            grids = {"samples": result["samples_grid"], "recon": result.get("recon_grid")}
            self.tracker.log_images(step, {k: v for k, v in grids.items() if v is not None})

    def write_final(
        self,
        model: torch.nn.Module,
        step: int,
        val_batches: Iterable[Mapping[str, Tensor]],
        records: Sequence[Mapping[str, Any]],
        device: torch.device,
    ) -> None:
        images = write_final_plots(
            self.root, model, val_batches, records, label_names=self.label_names, device=device
        )
        if self.log_images:
            self.tracker.log_images(step, images)
