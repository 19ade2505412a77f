"""Which updates are applied, logged and checkpointed, in real runs with faults injected into the step: a
GradScaler's overflows (fp16 loss scaling, exercised on the CPU with a real ``torch.amp.GradScaler``), NaN
losses, NaN gradients under a finite loss; plus per-rank reparameterisation noise and one set of BatchNorm
statistics for validation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.util import cpu_env, launch_cmd, metrics, run, tiny_overrides

pytestmark = pytest.mark.slow

# A probe that builds the real Trainer, injects one fault (FAULT=kind@step) and runs the job; each rank writes
# what the tests compare to OUT/rank{r}.json.
PROBE = """
import hashlib, json, math, os, sys
import torch
from vaejob.cli import setup_logging
from vaejob.config import load_config
from vaejob.train import Trainer

setup_logging()


def buffers_digest(module):
    data = b"".join(b.detach().double().cpu().numpy().tobytes() for b in module.buffers())
    return hashlib.sha256(data).hexdigest()[:16]


out_dir, overrides = sys.argv[1], sys.argv[2:]
kind, _, at = os.environ.get("FAULT", "none@0").partition("@")
at = int(at)
trainer = Trainer(load_config(None, overrides))
model = trainer.unwrapped
report = {"rank": trainer.rank}

if kind == "scaler":  # fp16's dynamic loss scaling, for real, on the CPU: what accelerate sets up on a GPU
    from accelerate.optimizer import AcceleratedOptimizer

    scaler = torch.amp.GradScaler("cpu", init_scale=float(at))
    trainer.acc.scaler, trainer.acc.native_amp = scaler, True
    AcceleratedOptimizer.__init__(trainer.opt, trainer.opt.optimizer, scaler=scaler)
if kind == "nan_loss":  # the input of the step that ends at `at` becomes NaN: its loss and gradients too
    model.register_forward_pre_hook(
        lambda m, args: (args[0] * math.nan,) if m.training and trainer.step == at - 1 else None
    )
if kind == "nan_grad":  # a finite loss whose gradients are NaN at the step that ends at `at`
    for p in model.parameters():
        p.register_hook(lambda g: g * math.nan if trainer.step == at - 1 else g)
if kind == "noise":  # the same images on every rank, the same weights: z differs only by the noise
    x = torch.linspace(0, 1, 4 * 3 * 16 * 16).view(4, 3, 16, 16)
    model.train()
    report["log_q"] = model.top_down(model.bottom_up(x)).log_q.tolist()
if kind == "val_buffers":  # what each rank's validation pass normalises with
    run_val = trainer.validator.run
    report["val_buffers"] = []

    def recording(m, step):
        report["val_buffers"].append([step, buffers_digest(m)])
        return run_val(m, step)

    trainer.validator.run = recording
try:
    report["code"] = trainer.fit()
except SystemExit as e:
    report["code"] = e.code
except Exception as e:
    report["code"], report["error"] = "raised", f"{type(e).__name__}: {e}"
report["nonfinite_skips"] = trainer.guard.nonfinite_skips
report["skipped_steps"] = trainer.guard.skipped_steps
report["scale"] = trainer.acc.scaler.get_scale() if trainer.acc.scaler is not None else None
report["final_buffers"] = buffers_digest(model)
report["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
json.dump(report, open(os.path.join(out_dir, f"rank{trainer.rank}.json"), "w"))
"""


def probe(shards: str, tmp_path: Path, fault: str, nproc: int = 1, **kw: Any) -> list[dict[str, Any]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    overrides = tiny_overrides(shards, tmp_path / "run", **{"wandb.mode": "disabled", **kw})
    cp = run(launch_cmd(nproc, str(script)) + [str(tmp_path)] + overrides, env=cpu_env(FAULT=fault))
    reports = [tmp_path / f"rank{r}.json" for r in range(nproc)]
    assert all(r.exists() for r in reports), cp.stderr[-3000:]
    return [json.loads(r.read_text()) | {"stderr": cp.stderr, "returncode": cp.returncode} for r in reports]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(d.split("_")[1]) for d in os.listdir(run_dir / "checkpoints") if d.startswith("step_"))


@pytest.mark.parametrize("on_nonfinite", ["skip", "stop"])
def test_loss_scale_overflows_belong_to_the_scaler(
    tiny_shards: str, tmp_path: Path, on_nonfinite: str
) -> None:
    # Initial scale 2^127: the scaled loss and gradients overflow fp32 until the scaler has halved it enough.
    (r,) = probe(
        tiny_shards,
        tmp_path,
        f"scaler@{2**127}",
        **{
            "train.mixed_precision": "fp16",
            "train.on_nonfinite": on_nonfinite,
            "train.max_steps": 100,
            "train.log_every": 10,
        },
    )
    assert r["code"] == 0, r.get("error") or r["stderr"][-3000:]
    assert r["nonfinite_skips"] == 0 and r["skipped_steps"] == 0  # overflows are not the job's skips
    overflows = round(np.log2(2**127 / r["scale"]))  # each overflow halves the scale (growth: after 2000)
    assert 3 <= overflows < 50 and r["finite"]
    train = metrics(tmp_path / "run", "train")
    assert [m["step"] for m in train] == list(range(10, 101, 10))
    assert all(np.isfinite(m["loss"]) for m in train)
    assert train[-1]["loss"] < train[0]["loss"]  # the updates after the overflows train it


def test_skipped_nan_step_stays_out_of_the_log_window(tiny_shards: str, tmp_path: Path) -> None:
    every_step = probe(
        tiny_shards, tmp_path / "a", "nan_loss@3", **{"train.on_nonfinite": "skip", "train.log_every": 1}
    )[0]
    windowed = probe(
        tiny_shards, tmp_path / "b", "nan_loss@3", **{"train.on_nonfinite": "skip", "train.log_every": 5}
    )[0]
    assert every_step["code"] == windowed["code"] == 0, windowed["stderr"][-3000:]
    assert windowed["skipped_steps"] == windowed["nonfinite_skips"] == 1
    per_step = {m["step"]: m for m in metrics(tmp_path / "a" / "run", "train")}
    assert 3 not in per_step  # a window of only the skipped step has nothing to report
    logged = metrics(tmp_path / "b" / "run", "train")
    assert [m["step"] for m in logged] == [5, 10, 15, 20]
    for key in ("loss", "recon", "kl"):
        first = logged[0][key]  # steps 1..5 without the skipped step 3: the mean of the four applied ones
        assert first == pytest.approx(np.mean([per_step[s][key] for s in (1, 2, 4, 5)]), rel=1e-5)
        assert all(np.isfinite(m[key]) for m in logged)
    assert logged[0]["skipped_steps"] == 1


def test_nan_gradients_never_reach_a_checkpoint(tiny_shards: str, tmp_path: Path) -> None:
    (r,) = probe(
        tiny_shards,
        tmp_path,
        "nan_grad@6",
        **{"train.on_nonfinite": "stop", "train.checkpoint_every": 1, "train.log_every": 10},
    )
    assert r["code"] == 3, r["stderr"][-3000:]
    assert "non-finite gradient at step 6" in r["stderr"]
    run_dir = tmp_path / "run"
    assert checkpoint_steps(run_dir)[-1] == 5
    assert "the last good checkpoint is" in r["stderr"] and "step_00000005" in r["stderr"]
    for step in checkpoint_steps(run_dir):
        weights = load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), step
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "non-finite gradient at step 6" in status["reason"]


def test_each_rank_draws_its_own_reparameterisation_noise(tiny_shards: str, tmp_path: Path) -> None:
    r0, r1 = probe(tiny_shards, tmp_path, "noise@0", nproc=2, **{"train.max_steps": 4})
    assert r0["code"] == r1["code"] == 0, r0["stderr"][-3000:]
    assert r0["final_buffers"] == r1["final_buffers"]  # still one model
    assert not np.allclose(r0["log_q"], r1["log_q"])  # the same x and weights: different noise per rank


def test_validation_uses_one_set_of_batchnorm_statistics(tiny_shards: str, tmp_path: Path) -> None:
    r0, r1 = probe(
        tiny_shards,
        tmp_path,
        "val_buffers@0",
        nproc=2,
        **{"model.norm": "batch", "train.max_steps": 20, "train.eval_every": 10},
    )
    assert r0["code"] == r1["code"] == 0, r0["stderr"][-3000:]
    assert [s for s, _ in r0["val_buffers"]] == [10, 20]
    assert r0["val_buffers"] == r1["val_buffers"]  # both ranks validate the same model: rank 0's
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000020" / "model.safetensors"))
    saved = weights[next(k for k in weights if k.endswith("running_mean"))]
    assert torch.isfinite(saved).all()


def test_half_precision_on_a_cpu_says_it_runs_fp32(tiny_shards: str, tmp_path: Path) -> None:
    (r,) = probe(tiny_shards, tmp_path, "none@0", **{"train.mixed_precision": "fp16", "train.max_steps": 2})
    assert r["code"] == 0, r["stderr"][-3000:]
    lines = [line for line in r["stderr"].splitlines() if "runs in fp32" in line]
    assert len(lines) == 1 and "train.mixed_precision=fp16 runs in fp32 on a CPU" in lines[0], lines
