"""EMA weights: the average itself, exact resume, and evaluation / sampling using them by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.util import launch_cmd, metrics, module_cmd, run, tiny_overrides
from vaejob.ema import EMA


def test_the_average_follows_the_warm_up_then_the_decay() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    expected = 0.0
    for t in range(1, 100):  # (1 + t) / (10 + t) reaches 0.9 at t = 81
        with torch.no_grad():
            model.weight.fill_(float(t))
        d = min(0.9, (1 + t) / (10 + t))  # a young average forgets fast: the random start does not linger
        expected = d * expected + (1 - d) * t
        ema.update(model)
        assert ema.module.weight[0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert ema.current_decay() == 0.9 and not ema.module.weight.requires_grad


EMA_RUN = {"train.ema_decay": 0.95, "train.lr_schedule": "constant", "train.checkpoint_every": 10}


@pytest.mark.slow
def test_ema_resumes_exactly_and_is_what_evaluation_and_sampling_use(
    tiny_shards: str, tmp_path: Path
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cp = run(launch_cmd(1) + tiny_overrides(tiny_shards, straight, **EMA_RUN, **{"train.max_steps": 30}))
    assert cp.returncode == 0, cp.stderr[-3000:]
    for max_steps in (20, 30):  # stop at 20 (a finished job), then continue the same run dir to 30
        cp = run(
            launch_cmd(1) + tiny_overrides(tiny_shards, resumed, **EMA_RUN, **{"train.max_steps": max_steps})
        )
        assert cp.returncode == 0, cp.stderr[-3000:]
    a = load_file(str(straight / "checkpoints" / "step_00000030" / "ema.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_00000030" / "ema.safetensors"))
    raw = load_file(str(straight / "checkpoints" / "step_00000030" / "model.safetensors"))
    assert a.keys() == b.keys() == raw.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a[k], raw[k]) for k in a)  # an average, not a copy
    assert [r["loss"] for r in metrics(straight, "val")] == pytest.approx(
        [r["loss"] for r in metrics(resumed, "val")]
    )

    def evaluate(*extra: str) -> dict:
        cp = run(module_cmd("vaejob.evaluate", 1) + ["--run", str(straight), "--iw-samples", "2", *extra])
        assert cp.returncode == 0, cp.stderr[-3000:]
        return json.loads(cp.stdout)

    ema, plain = evaluate(), evaluate("--weights", "raw")
    assert ema["weights"] == "ema" and plain["weights"] == "raw" and ema["nelbo"] != plain["nelbo"]
    assert ema["kl"] == pytest.approx(
        metrics(straight, "val")[-1]["kl"], rel=1e-5
    )  # training validated the EMA
    out = tmp_path / "samples"
    cp = run(module_cmd("vaejob.sample", 1) + ["--run", str(straight), "--num", "8", "--out", str(out)])
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["args"]["weights"] == "ema"
