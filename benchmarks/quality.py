"""Quality per model family on Fashion-MNIST at the same wall-clock budget: conv (the default job), resnet, hvae.

    python benchmarks/quality.py                                  # 10 min each, IW-NLL K=100, no FID (1.5-2 h here)
    python benchmarks/quality.py --budget-s 300 --iw-samples 1000 --fid 10000 --json quality.json
    python benchmarks/quality.py --families conv hvae --set train.batch_size=64 --launch python
    python benchmarks/quality.py --budget-s 360 --iw-samples 10 --family-set conv:train.max_steps=8424

Each family trains with its config (``configs/fashion_mnist.yaml``, ``fashion_mnist_resnet.yaml``,
``fashion_mnist_hvae.yaml``) exactly as a user launches it (``benchmarks/time_to_quality.py``'s launch:
``accelerate launch --multi_gpu --num_processes 2`` on the CPU box), one family after the other, with the same
likelihood for all (``--likelihood``, default a 5-component discretized logistic mixture: -ELBO in nats and
bits/dim mean the same for every family). At ``--budget-s`` seconds after its launch a job still running gets
SIGUSR1 (what Slurm sends before preemption): it checkpoints and exits 75; a job that finishes its
``train.max_steps`` first stops there; val passes, sample grids and periodic checkpoints inside the budget are off
(``BUDGET_CADENCE``). The newest checkpoint is then evaluated by ``vaejob.evaluate`` (the same
evaluator for all: exact passes over the 10k val images, one z per image for the -ELBO, ``--iw-samples`` K for
the IW-NLL over all latent groups, ``--fid`` generated images for FID/KID, 0 = off, at each ``--fid-temperature``). Prints a table (-ELBO,
IW-NLL, bits/dim, FID, steps, wall s, active units) and each family's margins over conv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.time_to_quality import TRAIN, ensure_shards, vaejob_cmd  # noqa: E402

CONFIGS = {
    "conv": REPO / "configs" / "fashion_mnist.yaml",
    "resnet": REPO / "configs" / "fashion_mnist_resnet.yaml",
    "hvae": REPO / "configs" / "fashion_mnist_hvae.yaml",
}
# The budget is for training: no val passes, sample grids or periodic checkpoints inside it (the evaluator
# measures the end). Left at the configs' cadences they would take unequal shares of it: a 10k-image val pass
# costs a deep model many times what it costs conv. ``--set`` can turn them back on.
BUDGET_CADENCE = [f"train.{k}_every=1000000000" for k in ("eval", "checkpoint", "sample")]
EXIT_PREEMPTED = 75
GRACE_S = 300.0  # after SIGUSR1: a checkpoint and W&B's shutdown


def _workers(pid: int, run_dir: Path) -> list[int]:
    """The launcher's training processes (Linux /proc): SIGUSR1 goes to them, as the job's own tests send it."""
    try:
        children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    mark, found = f"run.dir={run_dir}".encode(), []
    for child in children:
        with contextlib.suppress(OSError):  # it may have exited meanwhile
            if mark in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def train_for(
    family: str, shards: Path, work: Path, budget_s: float, overrides: list[str], launch: str, nproc: int
) -> dict[str, Any]:
    """Train one family until its max_steps or ``budget_s`` wall seconds, whichever comes first."""
    run_dir = work / family
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"data.shards={shards}", f"run.dir={run_dir}", "train.progress=false", *overrides]
    cmd, env = vaejob_cmd(launch, nproc, CONFIGS[family], sets)
    log_path = work / f"{family}-train.log"
    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            for pid in _workers(proc.pid, run_dir) or [proc.pid]:  # --launch python: the job itself
                with contextlib.suppress(ProcessLookupError):  # finished just now
                    os.kill(pid, signal.SIGUSR1)
            code = proc.wait(timeout=GRACE_S)
        end = time.time()
    status_path = run_dir / "status.json"  # absent when the job refused its config before starting
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    if status.get("state") not in ("completed", "preempted"):
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{family}: training exited {code} ({status.get('state')}); log {log_path}:\n{tail}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "run_dir": str(run_dir),
        "train_s": end - start,
        "state": status["state"],
        "step": status["step"],
        "first_train_loss": next((r["loss"] for r in records if r["split"] == "train"), math.nan),
        "val": [{k: r[k] for k in ("step", "nelbo")} for r in records if r["split"] == "val"],
    }


def evaluate_run(
    family: str, run_dir: str, work: Path, iw_samples: int, fid: list[str], launch: str, nproc: int
) -> dict[str, Any]:
    """``vaejob.evaluate`` on the run's newest checkpoint (the job's own evaluator, same launch as training)."""
    args = ["--run", run_dir, "--iw-samples", str(iw_samples), *fid]
    cmd, env = vaejob_cmd(launch, nproc, CONFIGS[family], [])
    cmd = [*cmd[: cmd.index(str(TRAIN))], "-m", "vaejob.evaluate", *args]  # accelerate launch's -m: a module
    log_path = work / f"{family}-eval.log"
    with open(log_path, "w") as log:
        start = time.time()
        code = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(
            f"{family}: evaluation exited {code}; log {log_path}:\n{log_path.read_text()[-3000:]}"
        )
    evals = sorted((Path(run_dir) / "eval").glob("val-step_*.json"))
    return {**json.loads(evals[-1].read_text()), "eval_s": time.time() - start}


def fid_columns(e: dict[str, Any]) -> dict[str, float]:
    """FID per sampling temperature: ``fid T=0.8`` ...; one temperature (or FID off) gives ``fid``."""
    by_t = e.get("fid_by_temperature")
    if by_t:
        return {f"fid T={t}": v["fid"] for t, v in by_t.items()}
    return {"fid": e.get("fid", math.nan)}


def row(family: str, res: dict[str, Any]) -> dict[str, Any]:
    e = res["eval"]
    return {
        "family": family,
        "nelbo": e["nelbo"],
        "iw_nll": e.get("iw_nll", math.nan),
        "bits_per_dim": e.get("nelbo_bits_per_dim", math.nan),
        "iw_bits_per_dim": e.get("bits_per_dim", math.nan),  # of the IW-NLL
        **fid_columns(e),
        "step": res["train"]["step"],
        "train_s": res["train"]["train_s"],
        "active_units": f"{e['active_units']}/{e['latent_dim']}",
    }


def report(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = [row(f, r) for f, r in results.items()]
    fids = [k for k in rows[0] if k.startswith("fid")] if rows else ["fid"]
    fid_head = " ".join(f"{k.upper():>10}" for k in fids)
    lines = [
        f"{'family':8} {'val -ELBO':>10} {'IW-NLL':>10} {'bits/dim':>9} {'IW b/d':>7} {fid_head} "
        f"{'steps':>6} {'train s':>8} {'active z':>9}"
    ]
    for r in rows:
        fid_cells = " ".join(f"{r.get(k, math.nan):10.2f}" for k in fids)
        lines.append(
            f"{r['family']:8} {r['nelbo']:10.2f} {r['iw_nll']:10.2f} {r['bits_per_dim']:9.4f} "
            f"{r['iw_bits_per_dim']:7.4f} {fid_cells} {r['step']:6d} {r['train_s']:8.0f} {r['active_units']:>9}"
        )
    base = next((r for r in rows if r["family"] == "conv"), None)
    if base is not None:
        lines.append("margins vs conv (negative = better than conv):")
        for r in rows:
            if r is not base:
                parts = [
                    f"{k} {r[k] - base[k]:+.2f}"
                    for k in ("nelbo", "iw_nll", *fids)
                    if math.isfinite(r.get(k, math.nan)) and math.isfinite(base.get(k, math.nan))
                ]
                lines.append(f"  {r['family']:8} " + ", ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--budget-s", type=float, default=600.0, help="training wall seconds per family (default 600)"
    )
    p.add_argument(
        "--iw-samples", type=int, default=100, help="importance samples K of the IW-NLL (default 100)"
    )
    p.add_argument("--fid", type=int, default=0, help="generated images for FID/KID (default 0: off)")
    p.add_argument(
        "--fid-real", type=int, default=0, help="real val images FID compares with (default 0: all)"
    )
    p.add_argument(
        "--fid-network", choices=["pytorch-fid", "fid-helper"], help="default: the configs' fid.network"
    )
    p.add_argument(
        "--fid-temperature",
        type=float,
        nargs="+",
        metavar="T",
        help="prior std scales of the FID samples (default 1.0); the table has a column for each",
    )
    p.add_argument("--families", nargs="+", choices=sorted(CONFIGS), default=["conv", "resnet", "hvae"])
    p.add_argument(
        "--likelihood", default="discretized_logistic_mixture", help="loss.likelihood of every family"
    )
    p.add_argument("--mixtures", type=int, default=5, help="loss.mixtures of every family")
    p.add_argument("--shards", type=Path, help="a Fashion-MNIST shard set (default: written into --work)")
    p.add_argument("--work", type=Path, help="run dirs and logs (default: a temporary dir)")
    p.add_argument("--launch", choices=["accelerate", "python", "gpu"], default="accelerate")
    p.add_argument("--nproc", type=int, default=2, help="processes with --launch accelerate or gpu")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every family")
    p.add_argument(
        "--family-set",
        action="append",
        default=[],
        metavar="FAMILY:key=value",
        help="an override for one family, e.g. conv:train.max_steps=8424 (so each fills the budget)",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.iw_samples < 1 or args.fid < 0 or args.fid_real < 0 or args.budget_s <= 0:
        p.error("--iw-samples must be >= 1, --fid >= 0 and --budget-s > 0")
    if any(not t > 0 for t in args.fid_temperature or []):
        p.error("--fid-temperature values must be > 0")
    per_family: dict[str, list[str]] = {f: [] for f in CONFIGS}
    for item in args.family_set:
        family, _, kv = item.partition(":")
        if family not in CONFIGS or "=" not in kv:
            p.error(f"--family-set {item!r}: use FAMILY:key=value with FAMILY one of {', '.join(CONFIGS)}")
        per_family[family].append(kv)
    fid = ["--fid", str(args.fid)]
    if args.fid and args.fid_real:
        fid += ["--fid-real", str(args.fid_real)]
    if args.fid and args.fid_network:
        fid += ["--fid-network", args.fid_network]
    if args.fid and args.fid_temperature:
        fid += ["--fid-temperature", *map(str, args.fid_temperature)]
    work = args.work or Path(tempfile.mkdtemp(prefix="vaejob-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = args.shards or ensure_shards(work / "shards", None)
    overrides = [f"loss.likelihood={args.likelihood}", f"loss.mixtures={args.mixtures}", *BUDGET_CADENCE]
    overrides += args.set
    results: dict[str, dict[str, Any]] = {}
    for family in args.families:
        print(f"{family}: training for up to {args.budget_s:.0f} s ...", flush=True)
        sets = overrides + per_family[family]
        trained = train_for(family, shards, work, args.budget_s, sets, args.launch, args.nproc)
        print(f"{family}: {trained['state']} at step {trained['step']}; evaluating ...", flush=True)
        ev = evaluate_run(family, trained["run_dir"], work, args.iw_samples, fid, args.launch, args.nproc)
        results[family] = {"train": trained, "eval": ev}
    lines = report(results)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
