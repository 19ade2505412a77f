"""Time to quality on Fashion-MNIST: the seed notebooks' model in a bare PyTorch loop vs vaejob's default job.

    python benchmarks/time_to_quality.py                  # 3 seeds, 60k/10k images (~10 min on 2 cores)
    python benchmarks/time_to_quality.py --quick          # CI: 1 seed, 12k images, 2 epochs a side (~1 min)
    python benchmarks/time_to_quality.py --seeds 0 --launch accelerate python:train.batch_size=64

For each seed, one after the other on the same shards and the same machine (so noise hits both alike):

  seed     the keras.io conv VAE of the seed notebooks (``configs/fashion_mnist_keras.yaml``'s model: Conv 32/64
           stride 2 -> Dense(16, ReLU) -> latent 16), in a bare PyTorch loop as a notebook runs it: whole split
           in memory, pixels/255, shuffled batches of 128, Adam 1e-3, ``--epochs`` epochs, an exact val pass after
           each epoch, torch's default threads (all cores). A subprocess: ``time_to_quality.py --seed-loop``.
  vaejob   ``vaejob/train.py --config configs/fashion_mnist.yaml`` exactly as a user runs it, only data.shards,
           run.dir and train.seed set. ``--launch accelerate`` (the default) is the launch scripts/demo.sh uses on
           one CPU box: ``accelerate launch --multi_gpu --num_processes 2``
           with ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 (2 processes x 1 thread, DDP over gloo);
           ``--launch python`` is ``python vaejob/train.py`` (1 process, all cores). Several specs run one after
           the other, each optionally with overrides: ``--launch accelerate python:train.batch_size=64``.
           ``--launch gpu`` is ``accelerate launch --num_processes N`` on N GPUs (``--nproc``; gpu_check.py).
           The job's val events in metrics.jsonl carry a wall-clock ``time``.

Quality is the validation split's -ELBO in nats per image (Bernoulli likelihood on pixels/255, one z sample):
the same number on both sides. Wall time is measured from just before each process is started (imports,
start-up, W&B and evaluations included) to the end of each evaluation. Prints every evaluation, then per seed
the wall time each side needs to reach 254 and 245 nats and vaejob's times over the seed loop's whole run
(targets: 254 within 0.5x, 245 within 1.0x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vaejob.config import load_config  # noqa: E402  (light: no torch)

TRAIN = REPO / "vaejob" / "train.py"
DEFAULT_CONFIG = REPO / "configs" / "fashion_mnist.yaml"
SEED_CONFIG = REPO / "configs" / "fashion_mnist_keras.yaml"
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
THRESHOLDS = (254.0, 245.0)
TARGETS = {
    254.0: 0.5,
    245.0: 1.0,
}  # vaejob must reach the threshold within this fraction of the seed loop's run


# ------------------------------------------------------------------------------------------- the seed loop
def seed_loop(shards: str, seed: int, epochs: int, events_path: str) -> None:
    """The notebook: data in memory, Adam 1e-3, batch 128, an exact val pass after every epoch."""
    import torch

    from vaejob.loader import make_loader
    from vaejob.loss import vae_loss
    from vaejob.models import build_model

    cfg = load_config(str(SEED_CONFIG), [f"data.shards={shards}"])

    def split(name: str) -> torch.Tensor:
        loader = make_loader(shards, name, 1000, num_workers=0, raw=True, rank=0, world_size=1)
        return torch.cat([b["image"][b["valid"]] for b in loader]).float().div_(255.0)

    train, val = split("train"), split("val")
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.loss, tuple(train.shape[1:]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bs = 128
    steps = len(train) // bs  # the partial last batch is dropped, as in fashion_mnist_keras.yaml
    images = 0
    with open(events_path, "w", buffering=1) as out:
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(train))
            for i in range(steps):
                x = train[order[i * bs : (i + 1) * bs]]
                loss = vae_loss(model.likelihood, model(x), x, cfg.loss, 1.0).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            images += steps * bs
            model.eval()
            gen = torch.Generator().manual_seed(seed)
            total, mus, hidden_max = 0.0, [], None
            with torch.no_grad():
                for i in range(0, len(val), 500):
                    x = val[i : i + 500]
                    features = model.bottom_up(x)
                    res = model.top_down(features, torch.randn(features[0].shape, generator=gen))
                    total += vae_loss(model.likelihood, res, x, cfg.loss, 1.0).nelbo.double().sum().item()
                    mus.append(res.mean)
                    hmax = res.hidden.amax(0)
                    hidden_max = hmax if hidden_max is None else torch.maximum(hidden_max, hmax)
            event = {
                "epoch": epoch,
                "images": images,
                "nelbo": total / len(val),
                "active_units": int((torch.cat(mus).double().var(0, correction=0) > 0.01).sum()),
                "time": time.time(),
            }
            if model.has_bottleneck:
                event["dead_hidden_units"] = int((hidden_max <= 0).sum())
                event["hidden_units"] = int(hidden_max.numel())
            out.write(json.dumps(event) + "\n")


# ------------------------------------------------------------------------------------------------ running
def ensure_shards(path: Path, limit: int | None, source_dir: str = FASHION_MNIST) -> Path:
    """Fashion-MNIST shards at ``path``, written from the IDX files in ``source_dir`` unless already there."""
    if (path / "manifest.json").exists():
        return path
    if not os.path.isdir(source_dir):
        raise SystemExit(
            f"no shards at {path} and no {source_dir}: apt-get install dataset-fashion-mnist, or pass --shards"
        )
    cmd = [
        sys.executable,
        "-m",
        "vaejob.shard",
        "--source",
        f"fashion-mnist:{source_dir}",
        "--out",
        str(path),
        "--overwrite",
    ]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return path


def vaejob_cmd(
    launch: str, nproc: int, config: Path, overrides: list[str]
) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if launch == "python":
        return [sys.executable, str(TRAIN), "--config", str(config), *overrides], env
    if launch == "gpu":  # one process per GPU (NCCL when there are several)
        env.pop("ACCELERATE_USE_CPU", None)
        multi = ["--multi_gpu"] if nproc > 1 else []
    else:  # scripts/demo.sh: DDP over gloo, one thread per process
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        multi = ["--multi_gpu"]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launcher = [accelerate, "launch", *multi, "--num_processes", str(nproc), "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(29500 + os.getpid() % 1000)]
    return [*launcher, str(TRAIN), "--config", str(config), *overrides], env


def run_timed(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[float, float]:
    """Start ``cmd``; returns (launch time, exit time), wall-clock seconds since the epoch."""
    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        end = time.time()
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; log {log_path}:\n{tail}")
    return start, end


def run_seed_loop(shards: Path, seed: int, epochs: int, work: Path, timeout: float) -> dict[str, Any]:
    events = work / f"seed{seed}-seedloop.jsonl"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--seed-loop", "--shards", str(shards)]
    cmd += ["--seeds", str(seed), "--epochs", str(epochs), "--events", str(events)]
    start, end = run_timed(cmd, dict(os.environ), work / f"seed{seed}-seedloop.log", timeout)
    evals = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    for e in evals:
        e["wall_s"] = e["time"] - start
    return {"evals": evals, "total_s": end - start}


def parse_launch(spec: str, nproc: int) -> tuple[str, str, list[str]]:
    """``python`` | ``accelerate`` | ``gpu`` [``:key=value,...``] -> (side label, launcher, extra overrides)."""
    launch, _, extra = spec.partition(":")
    if launch not in ("python", "accelerate", "gpu"):
        raise SystemExit(f"--launch {spec!r}: use python, accelerate or gpu, optionally with :key=value,...")
    overrides = [o for o in extra.split(",") if o]
    where = {"python": "", "accelerate": f" {nproc}x1", "gpu": f" {nproc} GPU"}[launch]
    label = "vaejob" + where + "".join(f" {o}" for o in overrides)
    return label, launch, overrides


def run_vaejob(
    shards: Path,
    seed: int,
    launch: str,
    overrides: list[str],
    work: Path,
    name: str,
    *,
    config: Path,
    nproc: int,
    timeout: float,
) -> dict[str, Any]:
    """One vaejob job, timed from its launch; returns its val evaluations (wall s, -ELBO, ...) and total time."""
    run_dir = work / f"seed{seed}-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.shards={shards}", f"run.dir={run_dir}", f"train.seed={seed}", *overrides]
    cmd, env = vaejob_cmd(launch, nproc, config, overrides)
    start, end = run_timed(cmd, env, work / f"seed{seed}-{name}.log", timeout)
    world = 1 if launch == "python" else nproc
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    batch = load_config(str(run_dir / "config.yaml")).train.batch_size
    train_count = load_manifest(shards)["splits"]["train"]["count"]
    evals = []
    for r in records:
        if r.get("split") != "val":
            continue
        images = r["step"] * batch * world
        e = {
            "step": r["step"],
            "epoch": images / train_count,
            "images": images,
            "nelbo": r["nelbo"],
            "active_units": r["active_units"],
            "wall_s": r["time"] - start,
        }
        if "dead_hidden_units" in r:
            e["dead_hidden_units"], e["hidden_units"] = r["dead_hidden_units"], r["hidden_units"]
        evals.append(e)
    return {"evals": evals, "total_s": end - start}


def load_manifest(shards: Path) -> dict[str, Any]:
    return json.loads((shards / "manifest.json").read_text())


def first_time(evals: list[dict[str, Any]], threshold: float) -> float | None:
    return next((e["wall_s"] for e in evals if e["nelbo"] <= threshold), None)


# ------------------------------------------------------------------------------------------------- report
def _units(e: dict[str, Any]) -> str:
    au = f"{e['active_units']}"
    return au + (
        f"  {e['hidden_units'] - e['dead_hidden_units']}/{e['hidden_units']}" if "hidden_units" in e else ""
    )


def report(results: dict[int, dict[str, Any]], epochs: int, judge: bool = True) -> list[str]:
    width = max(len(side) for sides in results.values() for side in sides) + 2
    lines = [
        f"{'seed':>4}  {'side':<{width}}{'epoch':>6}{'wall s':>8}{'val -ELBO':>11}  active z  live hidden"
    ]
    for seed, sides in results.items():
        for side, res in sides.items():
            for e in res["evals"]:
                lines.append(
                    f"{seed:>4}  {side:<{width}}{e['epoch']:>6.2f}{e['wall_s']:>8.1f}{e['nelbo']:>11.2f}  {_units(e)}"
                )
            lines.append(f"{seed:>4}  {side:<{width}}{'exit':>6}{res['total_s']:>8.1f}")
    lines.append("")
    lines.append(
        f"Wall s to reach the val -ELBO; x = that time / the seed loop's whole {epochs}-epoch run "
        f"(targets: {', '.join(f'{int(t)} within {f}x' for t, f in TARGETS.items())})."
    )
    head = f"{'seed':>4}  {'side':<{width}}{'final':>7}"
    for thr in THRESHOLDS:
        head += f"  {'to ' + str(int(thr)):>7}  {'x':>5}"
    lines.append(head + "  vaejob/seed to 254")
    ok = True
    for seed, sides in results.items():
        seed_evals = sides["seed"]["evals"]
        seed_run = seed_evals[-1]["wall_s"]  # the end of its last epoch's evaluation
        seed_254 = first_time(seed_evals, 254.0)
        for side, res in sides.items():
            row = f"{seed:>4}  {side:<{width}}{res['evals'][-1]['nelbo']:>7.2f}"
            for thr in THRESHOLDS:
                t = first_time(res["evals"], thr)
                x = t / seed_run if t is not None else math.inf
                if side != "seed":
                    ok &= x <= TARGETS[thr]
                row += f"  {_fmt(t):>7}  {_fmt(x, 2):>5}"
            t = first_time(res["evals"], 254.0)
            if side != "seed":
                row += f"  {_fmt(t / seed_254, 2) if t and seed_254 else 'seed never reaches 254':>8}"
            lines.append(row)
    if judge:
        lines.append(f"\ntargets on every seed and vaejob side: {'MET' if ok else 'NOT met'}")
    else:
        lines.append("\ntargets: judged on the full run only (--quick trains on 12k images for 2 epochs)")
    return lines


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or math.isinf(v) else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI: 1 seed, 12k images, 2 epochs a side")
    p.add_argument("--shards", type=Path, help="a Fashion-MNIST shard set (default: written into --work)")
    p.add_argument("--work", type=Path, help="run dirs, logs and shards (default: a temporary dir)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="seed loop epochs")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="vaejob side")
    p.add_argument(
        "--launch",
        nargs="+",
        default=["accelerate"],
        metavar="SPEC",
        help="vaejob side(s): accelerate (--nproc processes x 1 thread, as scripts/demo.sh; the default), "
        "python (1 process, all cores) or gpu (--nproc GPUs), each optionally followed by :key=value,... overrides",
    )
    p.add_argument("--nproc", type=int, default=2, help="processes with --launch accelerate or gpu")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="vaejob overrides")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--timeout", type=float, default=900, help="seconds per process")
    p.add_argument("--seed-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seed_loop:
        seed_loop(str(args.shards), args.seeds[0], args.epochs, args.events)
        return 0
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
    with tempfile.TemporaryDirectory(prefix="ttq-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = ensure_shards(args.shards or work / "fashion-mnist", 12000 if args.quick else None)
        train_count = int(load_manifest(shards)["splits"]["train"]["count"])
        sides = [parse_launch(spec, args.nproc) for spec in args.launch]
        results: dict[int, dict[str, Any]] = {}
        for seed in args.seeds:
            results[seed] = {"seed": run_seed_loop(shards, seed, args.epochs, work, args.timeout)}
            for i, (label, launch, extra) in enumerate(sides):
                overrides = [*args.set, *extra]
                if args.quick:  # the default job shortened to the seed loop's 2 epochs, evaluated every epoch
                    world = 1 if launch == "python" else args.nproc
                    batch = load_config(str(args.config), overrides).train.batch_size
                    per_epoch = train_count // (batch * world)
                    overrides = [
                        f"train.max_steps={2 * per_epoch}",
                        f"train.eval_every={per_epoch}",
                        *overrides,
                    ]
                results[seed][label] = run_vaejob(
                    shards,
                    seed,
                    launch,
                    overrides,
                    work,
                    f"vaejob{i}",
                    config=args.config,
                    nproc=args.nproc,
                    timeout=args.timeout,
                )
            took = ", ".join(f"{side} {res['total_s']:.0f} s" for side, res in results[seed].items())
            print(f"seed {seed}: {took} (logs in {work})", flush=True)
        lines = report(results, args.epochs, judge=not args.quick)
        print("\n".join(lines))
        if args.json:
            args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
