"""The GPU paths in real processes (``pytest -m cuda`` on a GPU machine; ``benchmarks/gpu_check.py`` runs them).

Each test runs on every device it can: ``cpu`` always (CI), ``cuda`` where there is a GPU (those cases carry the
``cuda`` mark). Paths that exist only on CUDA (fp16 with a GradScaler, an NCCL process group, CUDA graphs) skip
on a CPU-only machine with the reason. A probe script builds the real ``Trainer`` in a launched process, trains,
then reports what only the process can see: the device, the process group's backend, the dtypes under autocast,
the GradScaler, the memory format, the compiled module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from tests.util import (
    TINY_FAMILIES,
    assert_same_run,
    device_env,
    launch_cmd,
    manifest,
    metrics,
    module_cmd,
    run,
    tiny_overrides,
)
from vaejob.device import Platform, choose_precision, choose_workers, read_cpuinfo

pytestmark = pytest.mark.slow

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, NEEDS_GPU])
DEVICES = ["cpu", CUDA]


PROBE = """
import json, sys
import torch
from vaejob.config import load_config
from vaejob.loss import vae_loss
from vaejob.train import Trainer

trainer = Trainer(load_config(None, sys.argv[2:]))
code = trainer.fit()
x = trainer.to_input(torch.randint(0, 256, (8, *trainer.image_shape), dtype=torch.uint8))
with torch.no_grad(), trainer.acc.autocast():
    model_out = trainer.model(x)  # as in training: the noise is drawn inside
    logits = model_out.params
    out = vae_loss(trainer.unwrapped.likelihood, model_out, x, trainer.cfg.loss, 1.0)
# The prepared (compiled) forward against the eager model on the same noise (hvae's later groups depend on the
# earlier groups' samples), in fp32 proper: PyTorch lets cuDNN's convolutions use TF32 by default.
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
eps = torch.randn(len(x), trainer.unwrapped.latent_size, device=x.device)
with torch.no_grad():
    prepared, eager = trainer.model(x, eps=eps), trainer.unwrapped(x, eps=eps)
layers = {}  # what the layers inside the forward produce (accelerate hands the outputs back in fp32)


def record(name):
    def hook(module, args, output):
        layers[name] = str(output.dtype)

    return hook


# a layer of the encoder and the decoder's output layer, per family
LAYERS = {"ConvVAE": ("to_mu", "decoder"), "ResnetVAE": ("enc_out", "conv_out"), "HierarchicalVAE": ("stem", "out")}
for side, name in zip(("encoder", "decoder"), LAYERS[type(trainer.unwrapped).__name__]):
    getattr(trainer.unwrapped, name).register_forward_hook(record(side))
with torch.no_grad():
    getattr(trainer.model, "_orig_mod", trainer.model)(x)  # the prepared module, eager
scaler = trainer.acc.scaler
images = [p for p in trainer.unwrapped.parameters() if p.dim() == 4]
report = {
    "code": code,
    "device": trainer.device.type,
    "backend": trainer.acc.state.backend,  # fit() has ended the process group: what accelerate started
    "distributed_type": str(trainer.acc.distributed_type),
    "mixed_precision": trainer.acc.mixed_precision,
    "model": type(trainer.model).__name__,
    "unwrapped": type(trainer.unwrapped).__name__,
    "wrapped": type(getattr(trainer.model, "_orig_mod", trainer.model)).__name__,
    "dtypes": {
        k: str(v.dtype)
        for k, v in {
            "logits": logits, "loss": out.loss, "recon": out.recon,
            "kl": model_out.kl, "log_q": model_out.log_q, "log_p": model_out.log_p,
        }.items()
    },
    "layers": layers,
    "compiled_vs_eager": float(max((prepared.mean - eager.mean).abs().max(), (prepared.kl - eager.kl).abs().max())),
    "scaler": type(scaler).__name__ if scaler is not None else None,
    "scale": float(scaler.get_scale()) if scaler is not None else None,
    "weights_channels_last": all(p.is_contiguous(memory_format=torch.channels_last) for p in images),
    "input_channels_last": x.is_contiguous(memory_format=torch.channels_last),
}
json.dump(report, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def shards(make_shards) -> str:
    return make_shards("--source", "synthetic:600", "--size", "16", "--shard-size", "100")


def probe(
    tmp_path: Path, shards: str, device: str, env: dict | None = None, accelerate: bool = False, **kw
) -> tuple[dict, Path, str]:
    """Train in a launched process; returns (the probe's report, the run dir, its stderr)."""
    script, report, run_dir = tmp_path / "probe.py", tmp_path / "report.json", tmp_path / "run"
    script.write_text(PROBE)
    overrides = tiny_overrides(shards, run_dir, **{"wandb.mode": "disabled", **kw})
    launcher = launch_cmd(1, str(script), accelerate=accelerate)
    cp = run(launcher + [str(report), *overrides], env=env or device_env(device))
    assert cp.returncode == 0, cp.stderr[-4000:]
    out = json.loads(report.read_text())
    assert out["code"] == 0 and out["device"] == device, out
    return out, run_dir, cp.stderr


def assert_learns(run_dir: Path) -> None:
    losses = [r["loss"] for r in metrics(run_dir, "train")]
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3]), losses
    val = [v["nelbo"] for v in metrics(run_dir, "val")]  # exact passes over the whole val split
    assert len(val) >= 2 and all(np.isfinite(val)) and val[-1] < val[0], val


FAMILIES = {"conv": {}, **{f: dict(o.split("=", 1) for o in TINY_FAMILIES[f]) for f in ("resnet", "hvae")}}
CLASSES = {"conv": "ConvVAE", "resnet": "ResnetVAE", "hvae": "HierarchicalVAE"}
# the likelihood's parameters, the loss and its reconstruction term, the KL and log densities of the latents
FP32 = ["logits", "loss", "recon", "kl", "log_q", "log_p"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    "device, precision",
    [
        ("cpu", "bf16"),
        pytest.param(
            "cpu", "fp16", marks=pytest.mark.skip(reason="accelerate has no fp16 autocast on a CPU")
        ),
        pytest.param("cuda", "bf16", marks=[pytest.mark.cuda, NEEDS_GPU]),
        pytest.param("cuda", "fp16", marks=[pytest.mark.cuda, NEEDS_GPU]),
    ],
)
def test_mixed_precision_with_the_loss_in_fp32_and_channels_last(shards, tmp_path, device, precision, family):
    """Each family under autocast: its convolutions in half precision, the likelihood's parameters, the KL and the
    log densities of every latent group, and the loss in fp32 (hvae computes them from fp32 log sigmas, so that
    exp(2 log sigma) cannot overflow fp16)."""
    kw = {"train.mixed_precision": precision, "train.channels_last": "true", "train.max_steps": 30}
    out, run_dir, _ = probe(tmp_path, shards, device, **FAMILIES[family], **kw)
    half = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[precision]
    assert out["mixed_precision"] == precision and out["unwrapped"] == CLASSES[family]
    assert out["layers"] == {"encoder": half, "decoder": half}  # the model ran under autocast
    assert out["dtypes"] == dict.fromkeys(FP32, "torch.float32")  # the loss and the densities did not
    assert out["weights_channels_last"] and out["input_channels_last"]
    assert_learns(run_dir)
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    if precision == "fp16":  # on CUDA: a GradScaler, checkpointed so a resume continues its scale
        assert out["scaler"] == "GradScaler" and 0 < out["scale"] < float("inf")
        assert (ckpt / "scaler.pt").is_file()
    else:
        assert out["scaler"] is None and not (ckpt / "scaler.pt").exists()


@pytest.mark.cuda
@NEEDS_GPU
def test_nccl_process_group_on_one_gpu(shards, tmp_path):
    """What a Slurm task per GPU (``launch/submit.py``) exports: rank, world and rendezvous. accelerate then starts
    an NCCL process group with the job's collective timeout; its barriers (every checkpoint, the end) go through
    NCCL. With one rank accelerate wraps no DDP and the gloo decisions group is not needed."""
    port = str(29500 + (os.getpid() + 7) % 1000)
    env = device_env(
        "cuda", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
    )
    out, run_dir, _ = probe(tmp_path, shards, "cuda", env=env, accelerate=True, **{"train.max_steps": 30})
    assert out["backend"] == "nccl" and out["distributed_type"] == "DistributedType.MULTI_GPU"
    assert out["model"] == "ConvVAE"
    assert_learns(run_dir)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"


@pytest.mark.parametrize(
    "device, mode, family",
    [
        ("cpu", "default", "conv"),
        pytest.param("cuda", "default", "conv", marks=[pytest.mark.cuda, NEEDS_GPU]),
        pytest.param("cuda", "reduce-overhead", "conv", marks=[pytest.mark.cuda, NEEDS_GPU]),  # CUDA graphs
        pytest.param("cuda", "default", "resnet", marks=[pytest.mark.cuda, NEEDS_GPU]),
        pytest.param("cuda", "default", "hvae", marks=[pytest.mark.cuda, NEEDS_GPU]),
    ],
)
def test_torch_compile(shards, tmp_path, device, mode, family):
    kw = {"train.compile": mode, "train.max_steps": 30, "train.channels_last": "true"}
    out, run_dir, err = probe(tmp_path, shards, device, **FAMILIES[family], **kw)
    assert out["model"] == "OptimizedModule"
    # evaluation and figures run the eager model, not the compiled one
    assert out["unwrapped"] == CLASSES[family]
    assert out["wrapped"] == CLASSES[family]  # the compiled module still wraps what accelerate prepared
    assert out["compiled_vs_eager"] < 1e-3, out  # fp32: the compiled forward computes what eager does
    assert_learns(run_dir)
    assert "skipping cudagraphs" not in err, err[-3000:]  # reduce-overhead really replays CUDA graphs


def expected_auto(device: str) -> tuple[str, int]:
    """What ``auto`` resolves to for a one-process job on ``device`` here (the test runs on the same machine)."""
    if device == "cpu":
        platform = Platform("cpu", "", cpu_flags=read_cpuinfo()[0])
    else:
        platform = Platform.detect()
    return choose_precision(platform)[0], choose_workers(platform)[0]


@pytest.mark.parametrize("device", DEVICES)
def test_exact_resume_with_the_auto_values(shards, tmp_path, device):
    """A job stopped at step 10 and resumed trains exactly like one that ran 20 steps straight, with the values
    ``auto`` gives this device (on CUDA: bf16 or fp16, loader workers with pinned memory), ``channels_last`` and
    ``train.deterministic`` (cuDNN and cuBLAS pick deterministic kernels)."""
    kw = {
        "train.mixed_precision": "auto",
        "data.num_workers": "auto",
        "train.channels_last": "true",
        "train.deterministic": "true",
        "train.lr_schedule": "constant",  # the schedule must not depend on max_steps, which differs below
        "samples.final_plots": "false",
        "wandb.mode": "disabled",
    }
    env = device_env(device)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for run_dir, steps in ((straight, 20), (stopped, 10), (stopped, 20)):
        overrides = tiny_overrides(shards, run_dir, **kw, **{"train.max_steps": steps})
        cp = run(launch_cmd(1) + overrides, env=env)
        assert cp.returncode == 0, cp.stderr[-4000:]
    assert "resumed from" in cp.stderr
    assert_same_run(straight, stopped)
    precision, workers = expected_auto(device)
    saved = yaml.safe_load((stopped / "config.yaml").read_text())
    assert (saved["train"]["mixed_precision"], saved["data"]["num_workers"]) == (precision, workers)


@pytest.fixture(scope="module", params=DEVICES)
def device_run(request, shards, tmp_path_factory) -> tuple[str, Path]:
    """A run trained on the device with the ``auto`` values (what a user's default job does)."""
    device = request.param
    run_dir = tmp_path_factory.mktemp(f"run-{device}") / "run"
    overrides = tiny_overrides(
        shards,
        run_dir,
        **{"train.mixed_precision": "auto", "train.max_steps": 30, "wandb.mode": "disabled"},
    )
    cp = run(launch_cmd(1) + overrides, env=device_env(device))
    assert cp.returncode == 0, cp.stderr[-4000:]
    return device, run_dir


def evaluate(run_dir: Path, device: str) -> dict:
    cmd = [*module_cmd("vaejob.evaluate", 1), "--run", str(run_dir), "--iw-samples", "16"]
    cp = run(cmd, env=device_env(device))
    assert cp.returncode == 0, cp.stderr[-4000:]
    (path,) = (run_dir / "eval").glob("val-step_*.json")
    return json.loads(path.read_text())


def sample(run_dir: Path, device: str, out: Path) -> np.ndarray:
    cmd = [*module_cmd("vaejob.sample", 1), "--run", str(run_dir), "--num", "24"]
    cp = run([*cmd, "--out", str(out), "--shard-size", "10"], env=device_env(device))
    assert cp.returncode == 0, cp.stderr[-4000:]
    m = manifest(out)
    assert m["count"] == 24 and len(m["splits"]["samples"]["shards"]) == 3
    urls = [str(out / s["name"]) for s in m["splits"]["samples"]["shards"]]
    return np.stack([s["npy"] for s in wds.WebDataset(urls, shardshuffle=False).decode()])


def test_evaluate_and_sample_on_the_device(device_run, shards, tmp_path):
    device, run_dir = device_run
    result = evaluate(run_dir, device)
    assert result["count"] == manifest(shards)["splits"]["val"]["count"]
    assert np.isfinite(result["nelbo"]) and result["iw_nll"] <= result["nelbo"] + 1e-3
    images = sample(run_dir, device, tmp_path / "samples")
    assert images.shape == (24, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    if device == "cpu":
        return
    # The noise comes from CPU generators keyed by seed and sample: the CPU computes the same numbers.
    on_cpu = evaluate(run_dir, "cpu")
    assert on_cpu["count"] == result["count"]
    assert on_cpu["nelbo"] == pytest.approx(result["nelbo"], rel=1e-2)
    assert on_cpu["iw_nll"] == pytest.approx(result["iw_nll"], rel=1e-2)
    cpu_images = sample(run_dir, "cpu", tmp_path / "samples-cpu")
    assert np.abs(cpu_images.astype(int) - images.astype(int)).mean() < 2.0  # of 255 levels
