"""Sample grids and final plots (vaejob.plots, vaejob.figures) with a tiny linear stand-in VAE."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from vaejob import figures, plots, storage
from vaejob.models import SingleLatentVAE

GRAY = (1, 28, 28)
RGB = (3, 32, 32)


class TinyVAE(SingleLatentVAE):
    """vaejob.models' interface with linear maps and a dropout to expose train mode."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__()
        self.image_shape = image_shape
        self.latent_dim = latent_dim
        size = int(np.prod(image_shape))
        self.drop = nn.Dropout(0.5)
        self.enc = nn.Linear(size, 2 * latent_dim)
        self.dec = nn.Linear(latent_dim, size)

    def encode_hidden(self, x: Tensor) -> tuple[Tensor, Tensor, None]:
        mu, logvar = self.enc(self.drop(x.flatten(1))).chunk(2, dim=1)
        return mu, logvar, None

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(self.drop(z)).view(-1, *self.image_shape)

    def mean_image(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


def make_model(shape: tuple[int, int, int], latent_dim: int) -> TinyVAE:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return TinyVAE(shape, latent_dim)


def val_batches(shape: tuple[int, int, int], batches: int = 3, size: int = 8) -> Iterator[dict[str, Tensor]]:
    """Loader-like batches: the last two rows of each batch are padding (valid=False), labels 0..9, -1."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(batches):
        valid = torch.ones(size, dtype=torch.bool)
        valid[-2:] = False
        label = torch.randint(-1, 10, (size,), generator=gen)
        yield {"image": torch.rand(size, *shape, generator=gen), "label": label, "valid": valid}


def png_size(data: bytes) -> tuple[int, int, str]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.width, im.height, im.mode


def grid_hw(n: int, nrow: int, h: int, w: int, pad: int = 2) -> tuple[int, int]:
    cols = min(n, nrow)
    rows = -(-n // cols)
    return rows * (h + pad) + pad, cols * (w + pad) + pad


RECORDS = [
    {"step": s, "split": "train", "loss": 500.0 / s, "recon": 450.0 / s, "kl": 5.0 + s / 10}
    for s in range(1, 200)
] + [
    {"step": s, "split": "val", "loss": 600.0 / s, "recon": 540.0 / s, "kl": 6.0} for s in (50, 100, 150, 199)
]


# --- plots -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_make_grid_and_recon_grid_shapes(channels: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 5, 7, channels), dtype=np.uint8)
    grid = plots.make_grid(images, nrow=4, pad=1)
    assert grid.dtype == np.uint8 and grid.shape == (*grid_hw(10, 4, 5, 7, pad=1), channels)
    np.testing.assert_array_equal(grid[1:6, 1:8], images[0])
    np.testing.assert_array_equal(grid[1 + 2 * 6 :, 1 + 2 * 8 :], plots.PAD_VALUE)  # empty cells
    recons = 255 - images
    rgrid = plots.recon_grid(images, recons, nrow=4)
    assert rgrid.shape == (*grid_hw(24, 4, 5, 7), channels)  # 3 row pairs, last pair part empty
    np.testing.assert_array_equal(rgrid[2 + 7 : 2 + 7 + 5, 2 : 2 + 7], recons[0])  # right under its original
    np.testing.assert_array_equal(rgrid[2 + 2 * 7 : 2 + 2 * 7 + 5, 2 : 2 + 7], images[4])
    assert png_size(plots.to_png(grid))[2] == ("L" if channels == 1 else "RGB")
    assert plots.to_png(grid) == plots.to_png(grid.copy())


def test_interpolation_strip_places_endpoints() -> None:
    frames = np.zeros((3, 6, 4, 4, 1), dtype=np.uint8)
    ends = np.full((3, 2, 4, 4, 1), 200, dtype=np.uint8)
    grid = plots.interpolation_strip(frames, ends, pad=0)
    assert grid.shape == (12, 32, 1)
    assert (grid[:, :4] == 200).all() and (grid[:, -4:] == 200).all() and (grid[:, 4:-4] == 0).all()
    assert plots.interpolation_strip(frames, pad=0).shape == (12, 24, 1)


def test_manifold_grid_uses_gaussian_quantiles() -> None:
    seen: list[np.ndarray] = []

    def decode(z: np.ndarray) -> np.ndarray:
        seen.append(z)
        return np.full((len(z), 6, 6, 1), 0.5, dtype=np.float32)

    grid = plots.manifold_grid(decode, n=5, span=2.0)
    assert grid.shape == (30, 30, 1) and grid.dtype == np.uint8 and (grid == 128).all()
    z = seen[0].reshape(5, 5, 2)
    np.testing.assert_allclose(z[0, :, 0], plots.gaussian_grid(5, 2.0))  # columns: z0 increasing
    np.testing.assert_allclose(z[:, 0, 1], plots.gaussian_grid(5, 2.0)[::-1])  # rows: z1 decreasing downwards
    np.testing.assert_allclose(plots.gaussian_grid(5, 2.0)[[0, 2, 4]], [-2.0, 0.0, 2.0], atol=1e-9)


def test_pca_2d_finds_dominant_directions() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 6)) * np.array([0.1, 5.0, 0.1, 2.0, 0.1, 0.1]) + 3.0
    proj, ratio = plots.pca_2d(z)
    assert proj.shape == (500, 2)
    assert abs(np.corrcoef(proj[:, 0], z[:, 1])[0, 1]) > 0.99
    assert abs(np.corrcoef(proj[:, 1], z[:, 3])[0, 1]) > 0.99
    assert ratio[0] > ratio[1] > 0.1 and ratio.sum() <= 1.0
    np.testing.assert_array_equal(plots.pca_2d(z)[0], proj)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_latent_scatter_any_dim(dim: int) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, dim)).astype(np.float32)
    labels = rng.integers(-1, 4, 200)
    assert png_size(plots.latent_scatter(z, labels, ["zero", "one", "two", "three"]))[0] > 200
    assert png_size(plots.latent_scatter(z, None, None))[0] > 200
    many = rng.integers(0, 40, 200)  # too many classes for a legend: colour bar
    assert png_size(plots.latent_scatter(z, many, None))[0] > 200


def test_loss_curves_train_only_empty_and_full() -> None:
    train_only = [r for r in RECORDS if r["split"] == "train"] + [{"step": 3, "split": "train", "kl": "nan"}]
    for records in (RECORDS, train_only, [], [{"event": "start"}]):
        width, height, _ = png_size(plots.loss_curves(records))
        assert width > 800 and height > 200


def test_loss_curves_keeps_last_value_of_repeated_step() -> None:
    steps, values = plots._series(
        [{"step": 2, "split": "val", "kl": 1}, {"step": 2, "split": "val", "kl": 3}], "val", "kl"
    )
    assert steps.tolist() == [2] and values.tolist() == [3.0]


# --- samples -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [GRAY, RGB])
def test_generate_is_seeded_and_leaves_global_rng(shape: tuple[int, int, int]) -> None:
    model = make_model(shape, 4)
    model.train()
    cpu_state = torch.get_rng_state()
    a = figures.generate(model, 6, seed=7, device="cpu")
    b = figures.generate(model, 6, seed=7, device="cpu")
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert a.shape == (6, *shape) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, figures.generate(model, 6, seed=8, device="cpu"))
    assert not torch.equal(a, figures.generate(model, 6, seed=7, device="cpu", temperature=0.5))
    assert model.training and model.drop.training  # mode restored
    u8 = figures.to_uint8_nhwc(a)
    assert u8.dtype == np.uint8 and u8.shape == (6, shape[1], shape[2], shape[0])


def test_reconstruct_uses_mean_and_restores_modes() -> None:
    model = make_model(GRAY, 3)
    model.train()
    model.enc.eval()  # a submodule's own mode survives
    x = torch.rand(5, *GRAY)
    r1, r2 = figures.reconstruct(model, x), figures.reconstruct(model, (x * 255).round().to(torch.uint8))
    assert r1.shape == (5, *GRAY)
    torch.testing.assert_close(r1, r2, atol=0.02, rtol=0)
    assert model.training and model.drop.training and not model.enc.training


@pytest.mark.parametrize("shape", [GRAY, RGB])
def test_write_samples_local(tmp_path, shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    model = make_model(shape, 4)
    fixed = torch.rand(12, *shape)
    out = figures.write_samples(str(tmp_path), 1234, model, fixed, n=16, seed=3)
    step_dir = tmp_path / "samples" / "step_00001234"
    assert out["dir"] == str(step_dir)
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["step"] == 1234 and meta["n"] == 16 and meta["seed"] == 3 and meta["latent_dim"] == 4
    assert meta["image"] == {"channels": c, "height": h, "width": w}
    assert sorted(meta["files"]) == ["recon.png", "samples.npy", "samples.png"]
    assert sorted(p.name for p in step_dir.iterdir()) == sorted([*meta["files"], "meta.json"])

    arr = np.load(step_dir / "samples.npy", allow_pickle=False)
    assert arr.dtype == np.uint8 and arr.shape == (16, h, w, c)
    np.testing.assert_array_equal(arr, out["samples"])
    np.testing.assert_array_equal(arr, figures.to_uint8_nhwc(figures.generate(model, 16, 3, "cpu")))

    mode = "L" if c == 1 else "RGB"
    sh, sw = grid_hw(16, 4, h, w)
    assert png_size((step_dir / "samples.png").read_bytes()) == (sw, sh, mode)
    assert (
        out["samples_grid"].shape == (sh, sw, c)
        and out["samples_png"] == (step_dir / "samples.png").read_bytes()
    )
    rh, rw = grid_hw(32, 8, h, w)  # 12 images, 8 per row -> 2 row pairs of 8 tiles
    assert png_size((step_dir / "recon.png").read_bytes()) == (rw, rh, mode)
    assert out["recon_grid"].shape == (rh, rw, c)


def test_write_samples_without_fixed_images(tmp_path) -> None:
    out = figures.write_samples(str(tmp_path), 0, make_model(GRAY, 2), None, n=5)
    assert out["meta"]["files"] == ["samples.png", "samples.npy"] and "recon_png" not in out
    assert png_size(out["samples_png"])[:2] == grid_hw(5, 3, 28, 28)[::-1]


def test_write_samples_and_plots_to_fsspec_memory() -> None:
    root = f"memory://vaejob-test-{uuid.uuid4().hex}/run"
    fs = fsspec.filesystem("memory")
    try:
        model = make_model(RGB, 2)
        figures.write_samples(root, 5, model, torch.rand(4, *RGB), n=9)
        step_dir = storage.join(root, "samples", "step_00000005")
        meta = storage.read_json(storage.join(step_dir, "meta.json"))
        assert png_size(storage.read_bytes(storage.join(step_dir, "samples.png"))) == (104, 104, "RGB")
        arr = np.load(io.BytesIO(storage.read_bytes(storage.join(step_dir, "samples.npy"))))
        assert arr.shape == (9, 32, 32, 3) and meta["files"] == ["samples.png", "samples.npy", "recon.png"]
        figures.write_final_plots(root, model, val_batches(RGB), RECORDS)
        names = {
            p.rsplit("/", 1)[1] for p in fs.ls(storage.join(root, "plots").split("://", 1)[1], detail=False)
        }
        assert names == {
            "loss_curves.png",
            "temperatures.png",
            "latent_scatter.png",
            "manifold.png",
            "interpolation.png",
        }
        assert not [p for p in fs.find(root.split("://", 1)[1]) if ".tmp-" in p]
    finally:
        fs.rm(root.split("://", 1)[1].split("/")[0], recursive=True)


@pytest.mark.parametrize(("shape", "latent_dim"), [(GRAY, 2), (RGB, 6)])
def test_write_final_plots(tmp_path, shape: tuple[int, int, int], latent_dim: int) -> None:
    c, h, w = shape
    model = make_model(shape, latent_dim)
    model.train()
    encoded: list[int] = []
    original_encode = model.encode

    def counting_encode(x: Tensor) -> tuple[Tensor, Tensor]:
        encoded.append(len(x))
        return original_encode(x)

    model.encode = counting_encode  # type: ignore[method-assign]
    batches = val_batches(shape, batches=4)
    out = figures.write_final_plots(
        str(tmp_path), model, batches, RECORDS, label_names=[str(i) for i in range(10)], max_points=15
    )
    assert encoded == [6, 6, 3]  # 6 valid rows per batch; the 4th batch is never pulled
    assert len(list(batches)) == 1
    assert model.training and model.drop.training
    expected = {"loss_curves", "temperatures", "latent_scatter", "interpolation"} | (
        {"manifold"} if latent_dim == 2 else set()
    )
    assert set(out) == expected
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {f"{k}.png" for k in expected}
    for name, image in out.items():
        assert image.dtype == np.uint8 and image.ndim == 3
        width, height, _ = png_size((tmp_path / "plots" / f"{name}.png").read_bytes())
        assert image.shape[:2] == (height, width)
    # 7 pairs from 15 points, each row: original, 10 frames, original
    assert out["interpolation"].shape == (*grid_hw(7 * 12, 12, h, w), c)
    if latent_dim == 2:
        assert out["manifold"].shape == (15 * h, 15 * w, c)


def test_write_final_plots_without_val_points(tmp_path) -> None:
    model = make_model(GRAY, 3)
    empty = [
        {
            "image": torch.rand(2, *GRAY),
            "label": torch.tensor([-1, -1]),
            "valid": torch.tensor([False, False]),
        }
    ]
    out = figures.write_final_plots(str(tmp_path), model, empty, [])
    assert set(out) == {"loss_curves", "temperatures"}
