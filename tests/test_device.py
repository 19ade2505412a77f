"""``auto`` config values (vaejob.device): the rules, the facts they read, and a real job that resolves them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.util import cpu_env, launch_cmd, run, tiny_overrides
from vaejob.config import ConfigError, load_config
from vaejob.device import (
    MAX_CUDA_WORKERS,
    Platform,
    choose_precision,
    choose_workers,
    cpus_for_rank,
    read_cpuinfo,
    resolve_auto,
    use_deterministic_algorithms,
)


def gpu(major: int, minor: int = 0, cpus: int = 16, processes: int = 1) -> Platform:
    return Platform("cuda", "GPU", (major, minor), frozenset(), cpus, processes)


def cpu(*flags: str) -> Platform:
    return Platform("cpu", "CPU", None, frozenset(flags), 2, 1)


@pytest.mark.parametrize(
    "platform, precision",
    [
        (gpu(9, 0), "bf16"),  # Hopper
        (gpu(8, 0), "bf16"),  # Ampere
        (gpu(7, 5), "fp16"),  # Turing: fp16 tensor cores, no bf16
        (gpu(7, 0), "fp16"),  # Volta
        (gpu(6, 1), "no"),
        (cpu("avx512f", "avx512_bf16"), "bf16"),
        (cpu("avx512f", "amx_bf16", "amx_tile"), "bf16"),
        (cpu("avx512f", "avx2"), "no"),  # bf16 autocast measured 2.3x slower there
        (cpu("avx2"), "no"),
    ],
)
def test_precision_rule(platform, precision):
    value, why = choose_precision(platform)
    assert value == precision and why


@pytest.mark.parametrize(
    "platform, workers",
    [
        (cpu("avx2"), 0),  # on a CPU the loader runs in the training process
        (gpu(9, cpus=16), MAX_CUDA_WORKERS),
        (gpu(9, cpus=16, processes=2), 7),  # 8 CPUs each, one kept for the training loop
        (gpu(9, cpus=64, processes=8), 7),
        (gpu(9, cpus=2), 1),
        (gpu(9, cpus=1), 0),
        (gpu(9, cpus=4, processes=8), 0),  # fewer CPUs than processes
    ],
)
def test_workers_rule(platform, workers):
    assert choose_workers(platform)[0] == workers


def test_cpus_for_rank_reads_the_launcher_and_slurm(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    mine = len(os.sched_getaffinity(0))
    assert cpus_for_rank() == (mine, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # submitit exports it, but each task has its own CPUs
    assert cpus_for_rank() == (mine, 1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # one torchrun / accelerate agent started the node's ranks
    assert cpus_for_rank() == (mine, 4)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpus_for_rank() == (1, 4)


def test_read_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n"
    )
    flags, name = read_cpuinfo(str(path))
    assert name == "Test CPU 9000" and {"avx2", "avx512_bf16"} <= flags
    assert read_cpuinfo(str(tmp_path / "missing")) == (frozenset(), "cpu")


def test_resolve_auto_replaces_only_auto_values():
    cfg = load_config("configs/fashion_mnist.yaml")
    assert (cfg.train.mixed_precision, cfg.data.num_workers) == ("auto", "auto")
    resolved, notes = resolve_auto(cfg, gpu(9, cpus=16, processes=2))
    assert (resolved.train.mixed_precision, resolved.data.num_workers) == ("bf16", 7)
    assert sorted(notes) == ["data.num_workers", "train.mixed_precision"]
    assert notes["train.mixed_precision"].startswith("bf16 (GPU (compute capability 9.0)")
    assert cfg.train.mixed_precision == "auto"  # the original is left alone
    # what config.yaml holds reads back as the same resolved config
    again = yaml.safe_load(resolved.to_yaml())
    assert again["train"]["mixed_precision"] == "bf16" and again["data"]["num_workers"] == 7
    explicit = load_config("configs/fashion_mnist.yaml", ["train.mixed_precision=no", "data.num_workers=3"])
    same, notes = resolve_auto(explicit, gpu(9))
    assert same is explicit and notes == {}
    on_cpu, _ = resolve_auto(cfg, cpu("avx2"))
    assert (on_cpu.train.mixed_precision, on_cpu.data.num_workers) == ("no", 0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.num_workers=many", "config key 'data.num_workers' must be an integer or auto, got 'many'"),
        ("data.num_workers=true", "must be an integer or auto, got True"),
        ("data.num_workers=-1", "config key 'data.num_workers' must be >= 0"),
        ("train.mixed_precision=fp8", "use one of no|bf16|fp16|auto"),
        ("train.compile=fast", "must be true or false or default|reduce-overhead|max-autotune, got 'fast'"),
    ],
)
def test_bad_auto_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message or message in str(e.value), str(e.value)


def test_auto_and_compile_values_parse():
    cfg = load_config(None, ["data.num_workers=auto", "train.compile=reduce-overhead"])
    assert cfg.data.num_workers == "auto" and cfg.train.compile == "reduce-overhead"
    cfg = load_config(None, ["data.num_workers=4", "train.compile=true", "train.mixed_precision=no"])
    assert cfg.data.num_workers == 4 and cfg.train.compile is True and cfg.train.mixed_precision == "no"


def test_deterministic_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        use_deterministic_algorithms(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice stays
        use_deterministic_algorithms(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


AGREE_PROBE = """
import json, sys
from accelerate import Accelerator
from vaejob.config import ConfigError, load_config
from vaejob.device import Platform, agree_across_ranks, resolve_auto
from vaejob.ranks import CpuGroup

acc = Accelerator()
rank = acc.process_index
out = {"platform": Platform.detect().__dict__}
ranks = CpuGroup(acc.num_processes)
cfg, notes = resolve_auto(load_config(None, [f"data.num_workers={3 - rank}"]))
out["workers"] = agree_across_ranks(cfg, notes, ranks, announce=rank == 0).data.num_workers
cfg = load_config(None, [f"train.mixed_precision={['bf16', 'no'][rank]}"])
try:
    agree_across_ranks(cfg, {}, ranks, announce=False)
except ConfigError as e:
    out["error"] = str(e)
out["platform"]["cpu_flags"] = sorted(out["platform"]["cpu_flags"])
json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
# As the job's own commands do: a gloo group still alive at interpreter exit can abort a rank
# ("terminate called without an active exception", exit -6).
acc.end_training()
"""


@pytest.mark.slow
def test_ranks_agree_and_see_their_launcher(tmp_path):
    """Two real gloo ranks: workers that differ become the fewest, precisions that differ stop every rank, and
    each rank sees the two processes its ``accelerate launch`` started on these CPUs."""
    probe = tmp_path / "probe.py"
    probe.write_text(AGREE_PROBE)
    cp = run(launch_cmd(2, str(probe)) + [str(tmp_path)])
    assert cp.returncode == 0, cp.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["workers"] for r in ranks] == [2, 2]
    assert all(r["error"] == ranks[0]["error"] for r in ranks)
    assert "gives bf16 / no on different ranks" in ranks[0]["error"] and "\n" not in ranks[0]["error"]
    for r in ranks:
        assert r["platform"]["device"] == "cpu"  # ACCELERATE_USE_CPU=1 (tests/util.py cpu_env)
        assert r["platform"]["processes"] == 2
        assert r["platform"]["cpus"] == len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_a_job_writes_the_resolved_values_into_config_yaml(make_shards, tmp_path):
    shards = make_shards("--source", "synthetic:200", "--size", "16", "--shard-size", "100")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        shards,
        run_dir,
        **{
            "data.num_workers": "auto",
            "train.mixed_precision": "auto",
            "train.max_steps": 4,
            "wandb.mode": "disabled",
            "samples.final_plots": "false",
        },
    )
    cp = run(launch_cmd(1) + overrides, env=cpu_env())
    assert cp.returncode == 0, cp.stderr[-3000:]
    expected, _ = choose_precision(Platform("cpu", "", cpu_flags=read_cpuinfo()[0]))  # the job's CPU
    saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    assert saved["train"]["mixed_precision"] == expected
    assert saved["data"]["num_workers"] == 0  # CPU training
    line = next(ln for ln in cp.stderr.splitlines() if "auto: " in ln)
    assert f"train.mixed_precision={expected} (" in line and "data.num_workers=0 (training on the CPU" in line


@pytest.mark.slow
def test_evaluate_reads_a_config_yaml_that_still_says_auto(tiny_run, tmp_path):
    """config.yaml holds resolved values, but one written by hand (or by a tool) may say auto: evaluate and
    sample resolve it for the device they run on instead of handing "auto" to accelerate and the loader."""
    import shutil

    from vaejob.checkpoint import load_model

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["train"]["mixed_precision"] = saved["data"]["num_workers"] = "auto"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    loaded = load_model(str(run_dir))
    cfg = loaded[1]
    assert cfg.train.mixed_precision in ("no", "bf16", "fp16") and isinstance(cfg.data.num_workers, int)
