"""Image grids and diagnostic figures as pure functions of numpy arrays.

Grids are uint8 H×W×C arrays that keep the channel count of their inputs: grayscale stays one channel
(H×W×1, written as an 8-bit "L" PNG), RGB stays three. Figures are drawn on a plain
:class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``, so nothing touches the
process-wide backend or figure registry, nothing needs closing, and each function returns PNG bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

PAD_VALUE = 255
"""Separator colour of grids: white, visible between MNIST-like images on black backgrounds."""

LOSS_PANELS = (("loss", "total loss (negative ELBO)"), ("recon", "reconstruction"), ("kl", "KL divergence"))
SPLIT_STYLES = {
    "train": {"color": "tab:blue", "linewidth": 1.0, "alpha": 0.8},
    "val": {"color": "tab:orange", "linewidth": 1.6, "marker": "o", "markersize": 3},
}
MAX_DISCRETE_CLASSES = 20


def _check_images(images_u8: np.ndarray, name: str = "images_u8") -> None:
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
        raise ValueError(f"{name} must be a uint8 N×H×W×C array, got {images_u8.dtype} {images_u8.shape}")


def make_grid(images_u8: np.ndarray, nrow: int, pad: int = 2, *, pad_value: int = PAD_VALUE) -> np.ndarray:
    """Tile N×H×W×C uint8 images into one H'×W'×C grid with ``nrow`` images per row.

    Like ``torchvision.utils.make_grid``: ``pad`` pixels of ``pad_value`` around every tile, rows filled
    left to right, empty cells of a last partial row left at ``pad_value``. The channel count is kept.
    """
    _check_images(images_u8)
    n, h, w, c = images_u8.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if nrow < 1 or pad < 0:
        raise ValueError(f"need nrow >= 1 and pad >= 0, got nrow={nrow} pad={pad}")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, image in enumerate(images_u8):
        top = pad + (i // cols) * (h + pad)
        left = pad + (i % cols) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def to_png(image_u8: np.ndarray) -> bytes:
    """Encode an H×W, H×W×1, H×W×3 or H×W×4 uint8 array as PNG (same array -> same bytes)."""
    if image_u8.dtype != np.uint8 or image_u8.ndim not in (2, 3):
        raise ValueError(f"to_png needs a uint8 H×W[×C] array, got {image_u8.dtype} {image_u8.shape}")
    if image_u8.ndim == 3 and image_u8.shape[2] == 1:
        image_u8 = image_u8[:, :, 0]
    if image_u8.ndim == 3 and image_u8.shape[2] not in (3, 4):
        raise ValueError(f"to_png needs 1, 3 or 4 channels, got {image_u8.shape[2]}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_u8)).save(buf, format="PNG")
    return buf.getvalue()


def png_to_array(png: bytes) -> np.ndarray:
    """Decode PNG bytes to a uint8 H×W×3 (RGB) or H×W×1 (grayscale) array; alpha is dropped."""
    with Image.open(io.BytesIO(png)) as im:
        if im.mode == "L":
            return np.asarray(im, dtype=np.uint8)[:, :, None]
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _blank_rows(images_u8: np.ndarray, nrow: int, pad_value: int) -> np.ndarray:
    """``images_u8`` padded with ``pad_value`` tiles up to a whole number of rows of ``nrow``."""
    missing = -len(images_u8) % nrow
    if missing == 0:
        return images_u8
    blank = np.full((missing, *images_u8.shape[1:]), pad_value, dtype=np.uint8)
    return np.concatenate([images_u8, blank])


def recon_grid(
    originals_u8: np.ndarray, recons_u8: np.ndarray, nrow: int, pad: int = 2, *, pad_value: int = PAD_VALUE
) -> np.ndarray:
    """Each row of ``nrow`` originals directly above the row of their reconstructions.

    With ``N <= nrow`` this is the notebooks' "top originals, bottom reconstructions"; with more images the
    row pairs repeat downwards, so every reconstruction sits right under its original.
    """
    _check_images(originals_u8, "originals_u8")
    _check_images(recons_u8, "recons_u8")
    if originals_u8.shape != recons_u8.shape:
        raise ValueError(f"originals {originals_u8.shape} and reconstructions {recons_u8.shape} differ")
    if len(originals_u8) == 0:
        raise ValueError("recon_grid needs at least one image")
    cols = min(nrow, len(originals_u8))
    orig = _blank_rows(originals_u8, cols, pad_value).reshape(-1, cols, *originals_u8.shape[1:])
    rec = _blank_rows(recons_u8, cols, pad_value).reshape(-1, cols, *recons_u8.shape[1:])
    pairs = np.stack([orig, rec], axis=1).reshape(-1, *originals_u8.shape[1:])
    return make_grid(pairs, cols, pad, pad_value=pad_value)


def interpolation_strip(
    frames_u8: np.ndarray,
    endpoints_u8: np.ndarray | None = None,
    pad: int = 2,
    *,
    pad_value: int = PAD_VALUE,
) -> np.ndarray:
    """One row per pair: the decoded interpolation frames ``frames_u8`` (P×S×H×W×C, t = 0 ... 1).

    ``endpoints_u8`` (P×2×H×W×C), the two real images of each pair, are placed at the left and right ends
    of their row when given, so a row reads original A, decode(z_A) ... decode(z_B), original B.
    """
    if frames_u8.dtype != np.uint8 or frames_u8.ndim != 5 or 0 in frames_u8.shape[:2]:
        raise ValueError(f"frames_u8 must be a non-empty uint8 P×S×H×W×C array, got {frames_u8.shape}")
    rows = frames_u8
    if endpoints_u8 is not None:
        if endpoints_u8.dtype != np.uint8 or endpoints_u8.shape != (len(frames_u8), 2, *frames_u8.shape[2:]):
            raise ValueError(
                f"endpoints_u8 must be uint8 P×2×H×W×C matching frames, got {endpoints_u8.shape}"
            )
        rows = np.concatenate([endpoints_u8[:, :1], frames_u8, endpoints_u8[:, 1:]], axis=1)
    return make_grid(rows.reshape(-1, *rows.shape[2:]), rows.shape[1], pad, pad_value=pad_value)


def gaussian_grid(n: int, span: float) -> np.ndarray:
    """``n`` latent coordinates, evenly spaced in Gaussian probability between Φ(-span) and Φ(span).

    Kingma & Welling's manifold figure: equal steps of the CDF mapped back through the inverse CDF, so the
    grid is dense near the prior mode and reaches ±``span`` at its ends.
    """
    if n < 1 or span <= 0:
        raise ValueError(f"need n >= 1 and span > 0, got n={n} span={span}")
    if n == 1:
        return np.zeros(1)
    unit = NormalDist()
    lo, hi = unit.cdf(-span), unit.cdf(span)
    return np.array([unit.inv_cdf(p) for p in np.linspace(lo, hi, n)])


def manifold_grid(
    decode: Callable[[np.ndarray], np.ndarray], n: int = 15, span: float = 2.0, pad: int = 0
) -> np.ndarray:
    """Decode an n×n grid of 2-D latents (see :func:`gaussian_grid`) into one uint8 image.

    ``decode`` maps float32 (M, 2) latents to M images, N×H×W×C uint8 or float in [0, 1]. Columns follow
    z[0] increasing to the right, rows z[1] increasing upwards, as in a scatter plot of the latent space.
    """
    coords = gaussian_grid(n, span)
    z1, z0 = np.meshgrid(coords[::-1], coords, indexing="ij")
    z = np.stack([z0.ravel(), z1.ravel()], axis=1).astype(np.float32)
    images = np.asarray(decode(z))
    if images.dtype != np.uint8:
        images = np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    if images.ndim != 4 or len(images) != n * n:
        raise ValueError(f"decode returned {images.shape}, expected {n * n}×H×W×C")
    return make_grid(images, n, pad)


def _figure_png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _finite_float(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _series(records: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` for ``split``, sorted by step; a step logged twice (a run resumed from
    an earlier checkpoint repeats steps) keeps its last value."""
    by_step: dict[int, float] = {}
    for r in records:
        if r.get("split") != split or "step" not in r:
            continue
        value = _finite_float(r.get(key))
        if value is not None:
            by_step[int(r["step"])] = value
    steps = sorted(by_step)
    return np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=np.float64)


def _use_log_scale(values: Sequence[np.ndarray]) -> bool:
    """Log-y when every value is positive and they span more than a factor of 20."""
    v = np.concatenate([x for x in values if len(x)] or [np.zeros(0)])
    return bool(len(v) and v.min() > 0 and v.max() / v.min() > 20)


def loss_curves(records: Sequence[Mapping[str, Any]]) -> bytes:
    """Three panels (total, reconstruction, KL) of train and val curves from metrics.jsonl events.

    Events are dicts with ``step``, ``split`` ("train" or "val") and any of ``loss``, ``recon``, ``kl``;
    other events, missing keys and non-finite values are ignored. Missing splits simply have no line.
    """
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, len(LOSS_PANELS))
    for ax, (key, title) in zip(axes, LOSS_PANELS, strict=True):
        plotted = []
        for split, style in SPLIT_STYLES.items():
            steps, values = _series(records, split, key)
            if len(steps):
                ax.plot(steps, values, label=split, **style)
                plotted.append(values)
        if plotted:
            if _use_log_scale(plotted):
                ax.set_yscale("log")
            ax.legend(loc="upper right")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key} (nats per image)")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle("Training curves")
    fig.tight_layout()
    return _figure_png(fig)


def pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project N×D points on their first two principal components (numpy SVD of the centred data).

    Returns the N×2 projection and the explained-variance ratio of the two components. Each component's
    sign is fixed so its largest-magnitude loading is positive, making the plot reproducible.
    """
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"z must be a non-empty N×D array, got {z.shape}")
    centred = z.astype(np.float64) - z.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
    proj = np.zeros((len(z), 2))
    proj[:, : len(comps)] = centred @ comps.T
    var = s**2
    ratio = np.zeros(2)
    if var.sum() > 0:
        ratio[: len(comps)] = var[: len(comps)] / var.sum()
    return proj, ratio


def _class_name(label: int, label_names: Sequence[str] | None) -> str:
    if label_names is not None and 0 <= label < len(label_names):
        return str(label_names[label])
    return str(label)


def _scatter_labelled(
    ax: Axes, fig: Figure, xy: np.ndarray, labels: np.ndarray | None, label_names: Sequence[str] | None
) -> None:
    point = {"s": 5, "alpha": 0.6, "linewidths": 0}
    if labels is None or not (labels >= 0).any():
        ax.scatter(xy[:, 0], xy[:, 1], color="tab:blue", **point)
        return
    unlabelled = labels < 0
    if unlabelled.any():
        ax.scatter(*xy[unlabelled].T, color="lightgrey", label="unlabelled", **point)
    classes = np.unique(labels[~unlabelled])
    if len(classes) <= MAX_DISCRETE_CLASSES:
        palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        by_index = classes.max() < palette.N  # a class keeps its colour across runs when it can
        for rank, c in enumerate(classes):
            sel = labels == c
            ax.scatter(
                *xy[sel].T,
                color=palette(int(c) if by_index else rank),
                label=_class_name(int(c), label_names),
                **point,
            )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=3, frameon=False, title="label")
    else:
        sel = ~unlabelled
        sc = ax.scatter(*xy[sel].T, c=labels[sel], cmap="viridis", **point)
        fig.colorbar(sc, ax=ax, label="label index")


def latent_scatter(
    z: np.ndarray, labels: np.ndarray | None = None, label_names: Sequence[str] | None = None
) -> bytes:
    """Scatter of latent codes (N×D), coloured by class when ``labels`` (N, -1 = none) are given.

    D == 2 plots z[0] against z[1]; D > 2 plots the first two principal components (:func:`pca_2d`);
    D == 1 plots a strip of z[0] with a small fixed vertical jitter. Up to 20 classes get a legend with
    ``label_names``; more get a colour bar of the class index.
    """
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"z must be a non-empty N×D array with D >= 1, got {z.shape}")
    if labels is not None and labels.shape != (len(z),):
        raise ValueError(f"labels must have shape ({len(z)},), got {labels.shape}")
    n, d = z.shape
    fig = Figure(figsize=(7, 6) if d > 1 else (8, 3))
    ax = fig.subplots()
    if d == 1:
        jitter = np.random.default_rng(0).uniform(-0.5, 0.5, n)
        xy = np.stack([z[:, 0], jitter], axis=1)
        ax.set_yticks([])
        ax.set_ylim(-1, 1)
        ax.set_xlabel("z[0]")
        title = "Latent codes (1-D, vertical jitter only for visibility)"
    elif d == 2:
        xy = z
        ax.set_xlabel("z[0]")
        ax.set_ylabel("z[1]")
        title = "Latent codes"
    else:
        xy, ratio = pca_2d(z)
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
        title = f"Latent codes, PCA of {d}-D means"
    _scatter_labelled(ax, fig, xy, labels, label_names)
    ax.set_title(f"{title} (n={n})")
    ax.grid(True, alpha=0.3)
    return _figure_png(fig)
