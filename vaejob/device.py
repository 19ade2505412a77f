"""Device-aware config values: what ``train.mixed_precision: auto`` and ``data.num_workers: auto`` become.

The training job resolves them once at start-up, before its ``Accelerator`` exists (the precision is one of its
arguments), from facts every rank of a homogeneous job sees alike: the device it will train on, the GPU's
compute capability or the CPU's flags, and the CPUs this rank may use. ``agree_across_ranks`` then checks that
every rank got the same answer, so ``config.yaml`` and all ranks hold the same resolved values.

The rules are fixed tables built from measurements, not a timing taken at start-up: a measured choice could
differ between ranks and between a job and its requeued continuation (which must train like the uninterrupted
run), and timing a few steps would cost every start seconds on a noisy shared node.
``benchmarks/gpu_check.py`` measures both precisions on a GPU to check the table.

- precision: CUDA with compute capability >= 8.0 (Ampere and later: bf16 tensor cores) -> ``bf16``; 7.x (Volta,
  Turing: fp16 tensor cores, no bf16) -> ``fp16`` (with a GradScaler); older -> ``no``. A CPU with
  ``avx512_bf16`` or ``amx_bf16`` -> ``bf16`` (1.34x the images/s of fp32 for the default job at the same
  -ELBO); any other CPU -> ``no`` (bf16 autocast measured 2.3x slower with plain AVX-512 and 8x with AVX2).
- loader workers: 0 on a CPU (decoding npy is ~2% of a step and a worker process takes a core from the
  model); on CUDA one per CPU of this rank, keeping one for the training loop, at most ``MAX_CUDA_WORKERS``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from vaejob.cli import LOG_NAME
from vaejob.config import Config, ConfigError

log = logging.getLogger(LOG_NAME)

AUTO = "auto"
# Loader workers per rank on CUDA. One worker decodes ~20k 64x64 RGB npy images/s here (benchmarks/
# data_throughput.py), far more at 28x28; gpu_check.py measures how many a GPU's step rate needs.
MAX_CUDA_WORKERS = 8
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Platform:
    """What this rank will train on, as far as the auto values care."""

    device: str  # "cuda" or "cpu": the device the Accelerator will pick
    name: str  # the GPU's or the CPU's model name
    capability: tuple[int, int] | None = None  # CUDA compute capability
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cpus: int = 1  # CPUs this process may run on
    processes: int = 1  # training processes that share those CPUs

    @classmethod
    def detect(cls) -> Platform:
        cpus, processes = cpus_for_rank()
        flags, cpu_name = read_cpuinfo()
        if not job_uses_cuda():
            return cls("cpu", cpu_name, None, flags, cpus, processes)
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        return cls(
            "cuda",
            torch.cuda.get_device_name(index),
            torch.cuda.get_device_capability(index),
            flags,
            cpus,
            processes,
        )

    @property
    def cpus_per_process(self) -> int:
        return max(1, self.cpus // max(1, self.processes))


def job_uses_cuda() -> bool:
    """The device choice accelerate makes: CUDA when there is one, unless ACCELERATE_USE_CPU says otherwise."""
    from accelerate.utils import parse_flag_from_env

    return torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")


def cpus_for_rank() -> tuple[int, int]:
    """(CPUs this process may use, training processes that share them).

    ``accelerate launch`` / ``torchrun`` start a node's ranks from one agent (``TORCHELASTIC_RUN_ID``), so the
    ranks share its CPUs (``LOCAL_WORLD_SIZE`` of them). A Slurm task per rank (submitit) has its own
    ``SLURM_CPUS_PER_TASK``, also where Slurm does not bind tasks to CPUs.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    shared = os.environ.get("LOCAL_WORLD_SIZE", "1") if os.environ.get("TORCHELASTIC_RUN_ID") else "1"
    return cpus, max(1, int(shared) if shared.isdigit() else 1)


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[frozenset[str], str]:
    """(the CPU's feature flags, its model name); empty where there is no /proc/cpuinfo."""
    flags: frozenset[str] = frozenset()
    name = "cpu"
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = frozenset(value.split())
                elif key == "model name" and name == "cpu":
                    name = value.strip()
                if flags and name != "cpu":
                    break
    except OSError:
        pass
    return flags, name


def choose_precision(p: Platform) -> tuple[str, str]:
    """(``train.mixed_precision`` value, why)."""
    if p.device == "cuda":
        major, minor = p.capability or (0, 0)
        where = f"{p.name} (compute capability {major}.{minor})"
        if major >= 8:
            return "bf16", f"{where} has bf16 tensor cores"
        if major == 7:
            return "fp16", f"{where} has fp16 but no bf16 tensor cores; fp16 trains with a GradScaler"
        return "no", f"{where} has no tensor cores"
    found = [flag for flag in BF16_CPU_FLAGS if flag in p.cpu_flags]
    if found:
        return "bf16", f"the CPU has {found[0]} (bf16 measured 1.34x the images/s of fp32)"
    return "no", "the CPU has no avx512_bf16/amx_bf16 (bf16 autocast measured 2.3x-8x slower there)"


def choose_workers(p: Platform) -> tuple[int, str]:
    """(``data.num_workers`` value, why)."""
    if p.device != "cuda":
        return 0, "training on the CPU: a worker process would take a core from the model"
    share = p.cpus_per_process
    workers = max(0, min(MAX_CUDA_WORKERS, share - 1))
    who = f"{p.cpus} CPUs for {p.processes} processes" if p.processes > 1 else f"{p.cpus} CPUs"
    return workers, f"{who}: one per CPU but one for the training loop, at most {MAX_CUDA_WORKERS}"


def resolve_auto(cfg: Config, platform: Platform | None = None) -> tuple[Config, dict[str, str]]:
    """A copy of ``cfg`` without ``auto`` values, and ``{key: "value (why)"}`` for each one resolved."""
    wants_precision = cfg.train.mixed_precision == AUTO
    wants_workers = cfg.data.num_workers == AUTO
    if not (wants_precision or wants_workers):
        return cfg, {}
    p = platform or Platform.detect()
    notes: dict[str, str] = {}
    train, data = cfg.train, cfg.data
    if wants_precision:
        value, why = choose_precision(p)
        train = dataclasses.replace(train, mixed_precision=value)
        notes["train.mixed_precision"] = f"{value} ({why})"
    if wants_workers:
        workers, why = choose_workers(p)
        data = dataclasses.replace(data, num_workers=workers)
        notes["data.num_workers"] = f"{workers} ({why})"
    return dataclasses.replace(cfg, train=train, data=data), notes


def agree_across_ranks(cfg: Config, notes: dict[str, str], ranks: Any, announce: bool) -> Config:
    """Collective (``ranks`` is a ``vaejob.ranks.CpuGroup``): every rank must train with the same resolved values.

    Loader workers that differ (nodes with different CPU counts) become the smallest count, since the worker
    count shapes the batch order that a resume restores; a precision that differs (mixed GPU generations)
    stops the job with one line. ``announce`` (rank 0) logs what ``auto`` became.
    """
    mine = (cfg.train.mixed_precision, cfg.data.num_workers)
    everyone = ranks.gather(mine)
    precisions = sorted({p for p, _ in everyone})
    if len(precisions) > 1:
        raise ConfigError(
            f"train.mixed_precision=auto gives {' / '.join(precisions)} on different ranks (different devices); "
            "set train.mixed_precision explicitly"
        )
    fewest = min(w for _, w in everyone)
    if fewest != cfg.data.num_workers:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=fewest))
        notes = {**notes, "data.num_workers": f"{fewest} (the fewest of any rank)"}
    if announce and notes:
        log.info("auto: " + "; ".join(f"{key}={value}" for key, value in notes.items()))
    return cfg


def use_deterministic_algorithms(enabled: bool) -> None:
    """``train.deterministic``. cuBLAS is deterministic only with a fixed workspace, which it reads from the
    environment when its handle is made (torch raises at the first matmul on CUDA without it)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
