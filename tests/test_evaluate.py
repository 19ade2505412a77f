"""vaejob.evaluate on a real tiny run, in real processes (1 and 2 ranks over gloo); bad input to both CLIs."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.util import evaluate_json, module_cmd, run, wandb_records, wandb_runs
from vaejob.checkpoint import load_model
from vaejob.likelihoods import Bernoulli
from vaejob.loader import make_loader
from vaejob.metrics import iw_log_px, per_image_noise
from vaejob.models import SingleLatentVAE
from vaejob.seeding import item_generator
from vaejob.shards import open_shards

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_one_and_two_processes_agree(tiny_run: Path) -> None:
    wandb_before = len(wandb_runs(tiny_run))
    # batch size and IW pass size are free too: one image per IW pass here, the CPU default (2) with two ranks
    one = evaluate_json(tiny_run, 1, "--iw-samples", "100", "--batch-size", "5", "--iw-batch", "100")
    two = evaluate_json(tiny_run, 2, "--iw-samples", "100", "--batch-size", "8")
    for key in ("nelbo", "recon", "kl", "iw_nll"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=0), key
    np.testing.assert_allclose(two["kl_per_dim"], one["kl_per_dim"], rtol=1e-6)
    assert one["count"] == two["count"] == open_shards(str(one["shards"])).split("val").count
    assert one["active_units"] == two["active_units"]
    assert one["per_class"].keys() == two["per_class"].keys() <= {"ellipse", "heart", "square", "triangle"}
    assert sum(c["count"] for c in one["per_class"].values()) == one["count"]

    assert one["iw_nll"] <= one["nelbo"]  # the IWAE bound is tighter than the ELBO
    assert one["nelbo"] == pytest.approx(one["recon"] + one["kl"])
    # A Bernoulli decoder on [0, 1] intensities is no distribution over 8-bit images: no bits/dim for it
    # (tests/test_likelihoods.py checks bits/dim of the discrete likelihoods).
    assert one["likelihood"] == "bernoulli" and "bits_per_dim" not in one and "nelbo_bits_per_dim" not in one
    # BCE against grey levels, said so: not a normalised likelihood (tests/test_binarize.py)
    assert (one["binarize"], one["normalized_likelihood"]) == ("none", False)
    # training's last val pass drew each image's noise as --seed 0 does: the same numbers (batch 8 there)
    val = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in val if r["split"] == "val"][-1]
    for key in ("nelbo", "recon", "kl"):
        assert one[key] == pytest.approx(last[key], rel=1e-7, abs=0), key  # batch 8 vs 16: fp32 rounding

    written = json.loads((tiny_run / "eval" / "val-step_00000060.json").read_text())
    assert written == two and written["step"] == 60 and written["checkpoint"].endswith("step_00000060")
    for plot in ("traversal", "interpolation"):
        assert (tiny_run / "eval" / f"val-step_00000060-{plot}.png").stat().st_size > 100

    runs = wandb_runs(tiny_run)
    assert len(runs) == wandb_before + 2  # offline, one per evaluation, into the training run's id
    run_id = (tiny_run / "wandb_id.txt").read_text().strip()
    assert all(r.endswith(run_id) for r in runs)
    history = [r["history"]["item"] for r in wandb_records(runs[-1]) if r["type"] == "history"]
    logged = next(h for h in history if "eval/val/iw_nll" in h)
    assert logged["eval/val/iw_nll"] == pytest.approx(two["iw_nll"]) and logged["trainer/step"] == 60


def test_iw_estimate_tightens_with_k(tiny_run: Path) -> None:
    model, cfg, *_ = load_model(str(tiny_run))
    loader = make_loader(cfg.data.shards, "val", 64, rank=0, world_size=1, num_workers=0, with_keys=True)
    batch = next(iter(loader))
    keep = batch["valid"].nonzero().flatten().tolist()
    x = batch["image"][keep]
    nll = {}
    for k in (1, 10, 100):
        gens = [item_generator(0, batch["key"][i]) for i in keep]
        nll[k] = -iw_log_px(model, x, k, noise=per_image_noise(gens)).mean().item()
    assert nll[1] >= nll[10] - 0.5 and nll[10] >= nll[100] - 0.5, nll
    assert nll[1] - nll[100] > 1.0, nll  # not flat: the bound really tightens on this model


class OneDimVAE(SingleLatentVAE):
    """A VAE with a 1-D latent over 2x2 binary images: the decoder is a tiny MLP, the encoder a lookup of a
    Gaussian per image (set near the true posterior, so a few thousand importance samples suffice)."""

    latent_dim, image_shape = 1, (1, 2, 2)

    def __init__(self) -> None:
        super().__init__()
        self.likelihood = Bernoulli()
        g = torch.Generator().manual_seed(0)
        self.dec = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 4, bias=False))
        with torch.no_grad():
            for p in self.dec.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
        self.register_buffer("q", torch.zeros(16, 2))

    def index(self, x: Tensor) -> Tensor:
        return (x.flatten(1) @ torch.tensor([8.0, 4.0, 2.0, 1.0])).long()

    def encode_hidden(self, x: Tensor) -> tuple[Tensor, Tensor, None]:
        q = self.q[self.index(x)]
        return q[:, :1], q[:, 1:], None

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z).view(-1, 1, 2, 2)


def test_iw_estimator_matches_numerical_integration() -> None:
    model = OneDimVAE()
    x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).view(16, 1, 2, 2)
    # log p(x) = log ∫ p(x|z) N(z; 0, 1) dz on a dense grid (Bernoulli log-likelihood written out here).
    z = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    logits = model.decode(z.float()[:, None]).detach().double().flatten(1)  # (G, 4)
    pix = x.flatten(1).double()  # (16, 4)
    log_px_z = (pix[:, None] * F.logsigmoid(logits) + (1 - pix[:, None]) * F.logsigmoid(-logits)).sum(-1)
    log_joint = log_px_z - 0.5 * z**2 - 0.5 * math.log(2 * math.pi)  # (16, G)
    exact = torch.logsumexp(log_joint, 1) + math.log(z[1] - z[0])
    # q(z|x): the true posterior's moments, deliberately off by 0.3 in mean and log-variance
    post = torch.softmax(log_joint, 1)
    mean = (post * z).sum(1)
    var = (post * (z - mean[:, None]) ** 2).sum(1)
    model.q.copy_(torch.stack([mean + 0.3, var.log() + 0.3], 1).float())

    def estimate(k: int, chunk: int) -> Tensor:
        gens = [torch.Generator().manual_seed(i) for i in range(16)]
        return iw_log_px(model, x, k, noise=per_image_noise(gens), chunk=chunk)

    assert (estimate(20000, 1000) - exact).abs().max() < 0.05
    assert (estimate(20000, 3000) - exact).abs().max() < 0.05  # a ragged last chunk
    one = estimate(1, 1)
    assert one.mean() < exact.mean()  # one sample: the ELBO, below log p(x) on average


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def bad_inputs(
    tiny_run: Path, tiny_shards: str, make_shards, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    small = make_shards("--source", "synthetic:40", "--size", "8", "--val-fraction", "0.5")
    no_val = make_shards("--source", "synthetic:40", "--size", "16", "--train-only")
    empty = root / "no_ckpt"
    empty.mkdir()
    shutil.copy(tiny_run / "config.yaml", empty / "config.yaml")
    other = root / "other_model"
    other.mkdir()
    text = (tiny_run / "config.yaml").read_text()
    (other / "config.yaml").write_text(text.replace("latent_dim: 4", "latent_dim: 5"))
    os.symlink(tiny_run / "checkpoints", other / "checkpoints")
    return {
        "run": str(tiny_run),
        "small": small,
        "no_val": no_val,
        "empty": str(empty),
        "other": str(other),
        "shards": tiny_shards,
    }


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("evaluate", ["--run", "/nonexistent/run"], "run dir /nonexistent/run not found"),
        (
            "evaluate",
            ["--run", "{run}", "--shards", "{small}"],
            "holds 3x8x8 images but the model was trained on 3x16x16",
        ),
        (
            "evaluate",
            ["--run", "{run}", "--split", "test"],
            "has splits train, val; use --split val or --shards DIR",
        ),
        ("evaluate", ["--run", "{empty}"], "no complete checkpoint in"),
        (
            "evaluate",
            ["--run", "{run}", "--shards", "{no_val}"],
            "the val split of {no_val} holds no images; evaluate another --split or --shards",
        ),
        ("evaluate", ["--run", "{other}"], "does not fit"),
        ("sample", ["--run", "/nonexistent/run", "--num", "4", "--out", "{empty}/s"], "not found"),
        (
            "sample",
            ["--run", "{run}", "--num", "4", "--out", "{shards}"],
            "holds files vaejob.sample did not write",
        ),
        (
            "sample",
            ["--run", "{run}", "--num", "4", "--out", "x", "--temperature", "0"],
            "must be a number > 0",
        ),
    ],
)
def test_bad_inputs_one_line_exit_2(
    bad_inputs: dict[str, str], module: str, args: list[str], message: str
) -> None:
    cp = run(module_cmd(f"vaejob.{module}", 1) + [a.format(**bad_inputs) for a in args], timeout=60)
    message = message.format(**bad_inputs)
    lines = cp.stderr.strip().splitlines()
    assert cp.returncode == 2, cp.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"vaejob.{module}: error:") and message in lines[0], (
        cp.stderr
    )
    assert cp.stdout == ""
