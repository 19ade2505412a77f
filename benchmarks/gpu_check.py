"""vaejob on a GPU, in one command: the CUDA tests, training speed and memory per config and batch size, whether the
loader keeps up, and time to quality. Ready for the minutes a GPU machine is lent.

    python benchmarks/gpu_check.py                          # everything, within --budget-s (465 s) on one GPU
    python benchmarks/gpu_check.py --quick                  # tests, 3 batch sizes, loader; no time to quality
    python benchmarks/gpu_check.py --sections throughput,ttq --json out.json     # rerun some sections
    python benchmarks/gpu_check.py --sections env,tests --tests-k "exact_resume or evaluate"   # some tests
    bash benchmarks/gpu_check.sh                            # on a GPU machine without network (see that file)

Without a CUDA GPU it prints one line and exits 0 (CI runs it so). ``--device cpu`` runs the sections on the CPU
at whatever sizes are given (CI does, at toy sizes, to keep every code path here working).

Sections, in this order; each is written into the JSON (``--json``, default ``$OUT/gpu_check.json`` when OUT is
set, else ``runs/gpu_check.json``) as soon as it ends, so a run stopped at its time limit keeps what it measured:

  env         the GPU, driver, torch / CUDA / cuDNN, CPUs, and what ``auto`` resolves to here (vaejob.device)
  tests       ``pytest -m cuda tests/test_cuda.py``: AMP with the loss in fp32, GradScaler, NCCL, channels_last,
              torch.compile and CUDA graphs, exact resume, evaluate / sample on the GPU; outcome and time of each
  throughput  ``train_throughput.py`` per config and batch size (32..1024): the real Trainer's img/s beside a bare
              loop's, and peak GPU memory. Configs: the default, synthetic64, the same two in fp32 (does auto's
              bf16 measure faster?), configs/*.yaml without a seed-notebook tag (newer models join by name), the
              default with CUDA graphs, then the seed-notebook configs, as long as the budget lasts
  loader      the vaejob loader (uint8 batches in pinned memory, what the trainer reads) at 0, 1, 2, 4, 8 workers on
              Fashion-MNIST and 64x64 RGB shards, against the trainer's img/s from ``throughput``: the workers each
              step rate needs, and whether ``data.num_workers: auto`` gives enough
  ttq         ``configs/fashion_mnist.yaml`` as users launch it on the GPUs (``accelerate launch``, 64 images a step
              as on 2 CPU processes): seconds from launch to 254 and 245 nats, final -ELBO, img/s
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.data_throughput import VaejobEpochs, timed  # noqa: E402
from benchmarks.time_to_quality import (  # noqa: E402
    DEFAULT_CONFIG,
    FASHION_MNIST,
    ensure_shards,
    first_time,
    run_vaejob,
)
from benchmarks.train_throughput import small_shards  # noqa: E402
from vaejob import storage  # noqa: E402
from vaejob.config import ConfigError, load_config  # noqa: E402
from vaejob.device import Platform, choose_precision, choose_workers  # noqa: E402
from vaejob.shards import open_shards  # noqa: E402
from vaejob.tracking import read_metrics  # noqa: E402

SECTIONS = ("env", "tests", "throughput", "loader", "ttq")
# Seconds kept back for each section while the ones before it run (time they leave unused flows on): with the
# default 465 s the tests get about 235 s on one GPU (13 launched jobs, two of them compiling the model).
RESERVE = {"throughput": 100, "loader": 35, "ttq": 90}
# Image shape of a config whose shard set is not on this machine, by the shard directory's name.
SOURCE_SHAPES = {
    "fashion-mnist": (1, 28, 28),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "synthetic": (3, 64, 64),
}
# The trainer's timed loop includes its W&B (offline) records; a GPU image without wandb measures it without.
NO_WANDB = [] if importlib.util.find_spec("wandb") else ["wandb.mode=disabled"]
LOADER_SETS = {
    "fashion_mnist": (1, 28, 28),
    "synthetic64": (3, 64, 64),
}  # config -> the shape its loader reads


@dataclass
class Spec:
    """One throughput measurement: a config, its overrides, and (optionally) its own batch sizes."""

    config: str
    overrides: list[str] = field(default_factory=list)
    batch_sizes: list[int] | None = None

    @property
    def label(self) -> str:
        return " ".join([self.config, *self.overrides])

    @classmethod
    def parse(cls, text: str) -> Spec:
        """``NAME[@B1,B2][:key=value,...]``, e.g. ``fashion_mnist@64,1024:train.compile=reduce-overhead``."""
        head, _, extra = text.partition(":")
        name, _, sizes = head.partition("@")
        return cls(
            name, [o for o in extra.split(",") if o], [int(b) for b in sizes.split(",")] if sizes else None
        )


def default_specs() -> list[Spec]:
    configs = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    notebook = {c for c in configs if any(t.startswith("seed-notebook") for t in _config(c).wandb.tags)}
    first = [c for c in ("fashion_mnist", "synthetic64") if c in configs]
    fp32 = ["train.mixed_precision=no"]
    return [
        *(Spec(c) for c in first),
        *(Spec(c, fp32) for c in first),
        *(Spec(c) for c in configs if c not in first and c not in notebook),
        Spec("fashion_mnist", ["train.compile=reduce-overhead"], [256]),  # CUDA graphs
        # torch.compile of the deeper families: on this project's CPU it speeds resnet up ~1.45x, hvae ~1.03x
        *(
            Spec(c, ["train.compile=true"], [128])
            for c in ("fashion_mnist_resnet", "fashion_mnist_hvae")
            if c in configs
        ),
        *(Spec(c) for c in configs if c not in first and c in notebook),
    ]


def _config(name: str, overrides: list[str] | tuple[str, ...] = ()):
    return load_config(str(REPO / "configs" / f"{name}.yaml"), overrides)


def image_shape(name: str) -> tuple[int, int, int] | None:
    """The config's images: from its shard set when it is here, else from the source its shard dir names."""
    shards = _config(name).data.shards
    if os.path.exists(os.path.join(shards, "manifest.json")):
        return open_shards(shards).image_shape
    return SOURCE_SHAPES.get(os.path.basename(shards.rstrip("/")))


class Check:
    """The run: the deadline, the JSON written after every section, the work directory."""

    def __init__(self, args: argparse.Namespace, device: str, work: Path) -> None:
        self.args, self.device, self.work = args, device, work
        self.start = time.monotonic()
        self.end = self.start + args.budget_s
        self.result: dict[str, Any] = {"format": "vaejob-gpu-check/1", "device": device, "sections": {}}

    def left(self, section: str) -> float:
        """Seconds this section may use: until the deadline, minus what the sections after it keep back."""
        later = SECTIONS[SECTIONS.index(section) + 1 :]
        keep = sum(RESERVE.get(s, 0) for s in later if s in self.args.sections)
        return self.end - keep - time.monotonic()

    def save(self, section: str, value: Any) -> None:
        self.result["sections"][section] = value
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        storage.atomic_write_json(self.args.json, self.result)

    def run(self, cmd: list[str], section: str) -> subprocess.CompletedProcess:
        """``cmd`` in the repository, output captured, stopped when ``section``'s time is up."""
        timeout = max(30, self.left(section))
        return subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def env(self) -> dict[str, str]:
        """This environment with the repository first on the path (the wheels gpu_check.sh installs stay)."""
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}


def section_env(check: Check) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpus": len(os.sched_getaffinity(0)),
    }
    if check.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpus=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout else None
    platform = Platform.detect()
    info["auto"] = {
        "train.mixed_precision": "{} ({})".format(*choose_precision(platform)),
        "data.num_workers": "{} ({})".format(*choose_workers(platform)),
    }
    return info


def section_tests(check: Check) -> dict[str, Any]:
    junit = check.work / "junit.xml"
    marker = "cuda" if check.device == "cuda" else "not cuda"
    # -v: one line per test as it ends, so a run stopped at its time share still says which passed
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-rfEs",
        "--tb=short",
    ]
    cmd += ["tests/test_cuda.py", "-m", marker, f"--junitxml={junit}"]
    cmd += ["-k", check.args.tests_k] if check.args.tests_k else []
    log_path = Path(check.args.json).with_name("pytest.log")
    started = time.monotonic()
    # At its time share pytest gets SIGINT, not SIGKILL: it then still prints the failures' tracebacks and
    # writes the junit file for the tests it finished (a killed pytest says FAILED and nothing about why).
    proc = subprocess.Popen(cmd, cwd=REPO, env=check.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # 20 s of the share are kept for the interrupted pytest's report
        output, code = _text(proc.communicate(timeout=max(30, check.left("tests") - 20))[0]), proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            rest = proc.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            rest = proc.communicate()[0]
        output, code = _text(rest) + "\n[gpu_check: pytest stopped at its time share]", None
    log_path.write_text(output)
    print(output[-3000:], flush=True)
    tests = junit_cases(junit) if junit.exists() else verbose_cases(output)
    return {
        "marker": marker,
        "k": check.args.tests_k,
        "exit_code": code,
        "seconds": round(time.monotonic() - started, 1),
        "tests": tests,
        "log": str(log_path),
    }


def junit_cases(path: Path) -> list[dict[str, Any]]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name"):  # the entry pytest writes for an interrupted session
            continue
        found = [
            (kind, node) for kind in ("failure", "error", "skipped") if (node := case.find(kind)) is not None
        ]
        outcome, node = found[0] if found else ("passed", None)
        message = ((node.get("message") or "") if node is not None else "").strip()
        tests.append(
            {
                "test": case.get("name"),
                "outcome": outcome,
                "s": float(case.get("time", 0)),
                "message": message.splitlines()[0][:300] if message else "",
            }
        )
    return tests


def verbose_cases(output: str) -> list[dict[str, Any]]:
    """The tests ``pytest -v`` reported before it was stopped (no junit file then)."""
    found = re.findall(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, flags=re.M)
    return [{"test": name, "outcome": outcome.lower(), "s": 0.0, "message": ""} for name, outcome in found]


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def section_throughput(check: Check) -> list[dict[str, Any]]:
    a = check.args
    specs = [Spec.parse(s) for s in a.specs] if a.specs else default_specs()
    rows: list[dict[str, Any]] = []
    for spec in specs:
        base = {"config": spec.config, "variant": " ".join(spec.overrides)}
        shape = image_shape(spec.config)
        if shape is None:
            rows.append({**base, "error": "image shape unknown (its shard set is not here)"})
            continue
        if check.left("throughput") < 30:
            rows.append({**base, "error": "skipped: time budget"})
            continue
        out = check.work / f"throughput-{len(rows)}.json"
        sizes = spec.batch_sizes or a.batch_sizes
        cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py")]
        cmd += [
            "--config",
            str(REPO / "configs" / f"{spec.config}.yaml"),
            "--shape",
            ",".join(map(str, shape)),
        ]
        cmd += ["--rounds", str(a.rounds), "--chunk", str(a.chunk), "--warmup", str(a.warmup)]
        cmd += [
            "--batch-sizes",
            ",".join(map(str, sizes)),
            "--json",
            str(out),
            "train.progress=false",
            *NO_WANDB,
            *spec.overrides,
        ]
        print(f"throughput: {spec.label} at batch {','.join(map(str, sizes))}", flush=True)
        error = None
        try:
            cp = check.run(cmd, "throughput")
            if cp.returncode != 0:
                error = (cp.stderr.strip().splitlines() or [f"exit code {cp.returncode}"])[-1][:300]
        except subprocess.TimeoutExpired:
            error = "stopped: time budget"
        records = json.loads(out.read_text()) if out.exists() else []
        rows += [{**base, "shape": list(shape), **r} for r in records]
        if error:
            rows.append({**base, "error": error})
        check.save("throughput", rows)
    return rows


def section_loader(check: Check, throughput: list[dict[str, Any]]) -> dict[str, Any]:
    a = check.args
    auto_workers = choose_workers(Platform.detect())[0]
    counts = sorted({w for w in a.workers if w < max(2, check_cpus())} | {auto_workers})
    pin = check.device == "cuda"
    rates: list[dict[str, Any]] = []
    for name, shape in LOADER_SETS.items():
        root = check.work / f"loader-{name}"
        shards = loader_shards(check, name, shape, root)
        for workers in counts:
            if check.left("loader") < 10:
                rates.append({"config": name, "workers": workers, "error": "skipped: time budget"})
                continue
            epochs = VaejobEpochs(open_shards(shards), 256, workers, 2000, raw=True, pin_memory=pin)
            try:
                epochs(0)  # workers start, page cache
                measured = [timed(epochs, e)[0] for e in range(1, 1 + a.loader_epochs)]
            finally:
                epochs.close()
            rate = statistics.median(measured)
            rates.append({"config": name, "workers": workers, "images_per_s": rate})
            print(f"loader: {name} {shape}, {workers} workers: {rate:,.0f} img/s", flush=True)
    verdicts = []
    for row in throughput:
        if row.get("config") not in LOADER_SETS or row.get("variant") or "trainer" not in row:
            continue
        mine = {
            r["workers"]: r["images_per_s"]
            for r in rates
            if r["config"] == row["config"] and "images_per_s" in r
        }
        enough = [w for w in sorted(mine) if mine[w] >= row["trainer"]]
        verdicts.append(
            {
                "config": row["config"],
                "batch_size": row["batch_size"],
                "step_images_per_s": row["trainer"],
                "auto_workers": auto_workers,
                "loader_at_auto": mine.get(auto_workers),
                "auto_keeps_up": mine.get(auto_workers, 0) >= row["trainer"],
                "workers_needed": enough[0] if enough else None,
            }
        )
    return {"batch_size": 256, "pinned": pin, "rates": rates, "vs_training": verdicts}


def check_cpus() -> int:
    return len(os.sched_getaffinity(0))


def loader_shards(check: Check, name: str, shape: tuple[int, int, int], root: Path) -> str:
    """Fashion-MNIST itself when its files are here, else synthetic images of the config's shape."""
    if name == "fashion_mnist" and os.path.isdir(check.args.fashion_mnist):
        return str(
            ensure_shards(check.work / "fashion-mnist", check.args.fmnist_limit, check.args.fashion_mnist)
        )
    root.mkdir(parents=True, exist_ok=True)
    return small_shards(str(root), shape, check.args.loader_images)


def section_ttq(check: Check) -> dict[str, Any]:
    a = check.args
    if not os.path.isdir(a.fashion_mnist):
        return {"error": f"no Fashion-MNIST files in {a.fashion_mnist} (--fashion-mnist DIR)"}
    shards = ensure_shards(check.work / "fashion-mnist", a.fmnist_limit, a.fashion_mnist)
    gpus = torch.cuda.device_count() if check.device == "cuda" else 1
    launch = "gpu" if check.device == "cuda" else "python"
    overrides = [
        f"train.batch_size={max(1, 64 // gpus)}",
        "wandb.mode=disabled",
        "train.progress=false",
        *a.ttq_set,
    ]
    run_dir = check.work / "seed0-ttq"  # run_vaejob's name for it
    try:
        res = run_vaejob(
            shards,
            0,
            launch,
            overrides,
            check.work,
            "ttq",
            config=DEFAULT_CONFIG,
            nproc=gpus,
            timeout=max(30, check.left("ttq")),
        )
    except subprocess.TimeoutExpired:
        val = [r["nelbo"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if r.get("split") == "val"]
        return {"error": f"stopped: time budget (val -ELBO so far: {[round(v, 2) for v in val]})"}
    saved = load_config(str(run_dir / "config.yaml"))
    rates = [
        r["images_per_s"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if r.get("split") == "train"
    ]
    evals = res["evals"]
    return {
        "gpus": gpus,
        "images_per_step": saved.train.batch_size * gpus,
        "mixed_precision": saved.train.mixed_precision,
        "num_workers": saved.data.num_workers,
        "to_254_s": first_time(evals, 254.0),
        "to_245_s": first_time(evals, 245.0),
        "final_nelbo": evals[-1]["nelbo"] if evals else None,
        "total_s": res["total_s"],
        "median_images_per_s": statistics.median(rates[1:] or rates) if rates else None,
        "evals": evals,
    }


def print_tables(result: dict[str, Any]) -> None:
    s = dict(result["sections"])
    for name, value in list(s.items()):
        if isinstance(value, dict) and set(value) == {"error"}:
            print(f"\n{name}: {value['error']}")
            del s[name]
    if "env" in s:
        e = s["env"]
        gpu = f"{e.get('gpu')} x{e.get('gpus')} (capability {e.get('capability')}, {e.get('memory_gib')} GiB, driver {e.get('driver')})"
        print(
            f"\n{gpu if 'gpu' in e else 'CPU'}; torch {e['torch']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, {e['cpus']} CPUs"
        )
        for key, value in e["auto"].items():
            print(f"  auto: {key} = {value}")
    if "tests" in s:
        t = s["tests"]
        only = f" -k '{t['k']}'" if t.get("k") else ""
        print(f"\npytest -m '{t['marker']}'{only}: exit {t['exit_code']} in {t['seconds']} s")
        for case in t["tests"]:
            print(f"  {case['outcome']:<8}{case['s']:>7.1f} s  {case['test']}  {case['message']}")
    if "throughput" in s:
        print(
            f"\n{'config':<18}{'variant':<32}{'batch':>6}{'trainer img/s':>15}{'bare img/s':>12}{'ratio':>7}{'peak MiB':>10}"
        )
        for r in s["throughput"]:
            head = f"{r['config']:<18}{r['variant']:<32}"
            if "error" in r:
                print(f"{head}{'':>6}  {r['error']}")
            else:
                peak = f"{r['peak_memory_mib']:>10.0f}" if "peak_memory_mib" in r else f"{'-':>10}"
                print(
                    f"{head}{r['batch_size']:>6}{r['trainer']:>15,.0f}{r['bare']:>12,.0f}{r['ratio']:>7.2f}{peak}"
                )
    if "loader" in s:
        lo = s["loader"]
        print(f"\nloader, uint8 batches of {lo['batch_size']}{', pinned' if lo['pinned'] else ''}:")
        for r in lo["rates"]:
            rate = f"{r['images_per_s']:>12,.0f} img/s" if "images_per_s" in r else r["error"]
            print(f"  {r['config']:<16}{r['workers']:>3} workers {rate}")
        for v in lo["vs_training"]:
            need = v["workers_needed"] if v["workers_needed"] is not None else "more than measured"
            at_auto = f"{v['loader_at_auto']:,.0f}" if v["loader_at_auto"] else "-"
            print(
                f"  {v['config']:<16}batch {v['batch_size']:>5}: step {v['step_images_per_s']:>10,.0f} img/s; "
                f"auto ({v['auto_workers']} workers) reads {at_auto}: {'keeps up' if v['auto_keeps_up'] else 'LOADER-BOUND'}; "
                f"needs {need}"
            )
    if "ttq" in s:
        q = s["ttq"]
        fmt = lambda v: f"{v:.1f} s" if v is not None else "not reached"  # noqa: E731
        print(
            f"\ntime to quality, configs/fashion_mnist.yaml on {q['gpus']} device(s), {q['images_per_step']} images a "
            f"step, {q['mixed_precision']}, {q['num_workers']} workers: 254 nats {fmt(q['to_254_s'])}, 245 nats "
            f"{fmt(q['to_245_s'])}, final {q['final_nelbo']:.2f} nats, exit {q['total_s']:.1f} s, "
            f"{q['median_images_per_s']:,.0f} img/s"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    out = os.environ.get("OUT")
    p.add_argument(
        "--json",
        default=os.path.join(out, "gpu_check.json") if out else str(REPO / "runs" / "gpu_check.json"),
    )
    p.add_argument(
        "--quick", action="store_true", help="tests, batch 32/256/1024 for two configs, loader; no ttq"
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument(
        "--budget-s", type=float, default=465, help="the whole run's seconds (sections share them)"
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the same sections on the CPU"
    )
    p.add_argument(
        "--tests-k",
        metavar="EXPR",
        help="tests: only these (pytest -k), e.g. 'exact_resume or evaluate' when time is short",
    )
    p.add_argument("--batch-sizes", default="32,64,128,256,512,1024")
    p.add_argument("--specs", nargs="*", help="throughput: NAME[@B1,B2][:key=value,...] (default: see above)")
    p.add_argument("--rounds", type=int, default=5, help="throughput: timed chunks per loop")
    p.add_argument("--chunk", type=int, default=20, help="throughput: steps per chunk")
    p.add_argument("--warmup", type=int, default=10, help="throughput: untimed steps first")
    p.add_argument("--workers", default="0,1,2,4,8", help="loader worker counts (those below the CPU count)")
    p.add_argument("--loader-images", type=int, default=20000, help="synthetic 64x64 images for the loader")
    p.add_argument("--loader-epochs", type=int, default=2, help="timed epochs per worker count")
    p.add_argument("--fashion-mnist", default=FASHION_MNIST, help="dir with the Fashion-MNIST IDX .gz files")
    p.add_argument("--fmnist-limit", type=int, help="shard only this many Fashion-MNIST images")
    p.add_argument(
        "--ttq-set", nargs="*", default=[], metavar="key=value", help="ttq: extra config overrides"
    )
    p.add_argument("--work", type=Path, help="keep shards, run dirs and logs here (default: a temporary dir)")
    a = p.parse_args(argv)
    a.sections = [s for s in a.sections.split(",") if s]
    unknown = [s for s in a.sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {', '.join(unknown)}; use {','.join(SECTIONS)}")
    for text in a.specs or []:
        spec = Spec.parse(text)
        try:
            _config(spec.config, spec.overrides)
        except ConfigError as e:
            p.error(f"--specs {text}: {e}")
    if a.quick:
        a.batch_sizes, a.rounds = "32,256,1024", 3
        a.specs = a.specs or ["fashion_mnist", "synthetic64"]
        a.workers = "0,1,4"
        a.sections = [s for s in a.sections if s != "ttq"]
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    a.workers = [int(w) for w in a.workers.split(",")]
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}); nothing to measure, exiting 0")
        return 0
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the job, the tests and the auto values follow the CPU
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        check = Check(args, args.device, work)
        throughput: list[dict[str, Any]] = []
        for name in args.sections:
            print(f"== {name} ({check.left(name):.0f} s for it)", flush=True)
            try:
                if name == "env":
                    value: Any = section_env(check)
                elif name == "tests":
                    value = section_tests(check)
                elif name == "throughput":
                    value = throughput = section_throughput(check)
                elif name == "loader":
                    value = section_loader(check, throughput)
                else:
                    value = section_ttq(check)
            except (Exception, SystemExit) as e:  # one section's failure must not cost the others' minutes
                traceback.print_exc()
                lines = str(e).strip().splitlines()
                value = {"error": f"{type(e).__name__}: {lines[-1] if lines else ''}"}
            check.save(name, value)
        check.result["complete"] = True
        check.save(args.sections[-1], check.result["sections"][args.sections[-1]])
    print_tables(check.result)
    print(f"\nJSON: {args.json} ({check.result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
