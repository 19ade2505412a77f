"""Generate samples from a trained run as a shard set: ``accelerate launch -m vaejob.sample --run RUN --num N
--out DIR_or_URL`` (or ``python -m``).

The output is a vaejob shard set (docs/CONTRACTS.md) with one split, ``samples``: ``samples-000000.tar ...``
(``sample-000000123.npy``, uint8 H×W×C), ``manifest.json`` (written last), ``samples.png`` (the first 64) and
``parts/samples-XXXXXX.json``, one record per finished shard, which makes an interrupted job resumable.

Sample ``i``'s latent comes from a generator seeded by ``(--seed, i)``, shard ``s`` holds samples
``[s*S, (s+1)*S)`` decoded in batches from the shard's start, and shard ``s`` is written by rank
``s mod world``: the bytes depend on the arguments, never on the rank count. A rerun skips every shard whose
record matches the arguments and whose bytes still hash to the recorded sha256.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import re
import sys
import time
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from vaejob import figures, plots, storage
from vaejob.checkpoint import EMA_FILE, WEIGHTS_FILE, load_model
from vaejob.cli import (
    EXIT_OK,
    LOG_NAME,
    UsageError,
    UserError,
    int_type,
    positive_float,
    report,
    run_parser,
    setup_logging,
)
from vaejob.config import prepare_storage
from vaejob.loader import make_loader
from vaejob.models import VAE
from vaejob.seeding import item_generator
from vaejob.shards import sha256_file
from vaejob.shards.codec import encode_image
from vaejob.shards.format import MANIFEST, PARTS, build_manifest, shard_name, write_manifest
from vaejob.shards.tar import TarWriter

PROG = "vaejob.sample"
SPLIT = "samples"
GRID = "samples.png"
GRID_SIZE = 64
ENCODING = "npy"
DEFAULT_SHARD_SIZE = 5000
_SHARD_RE = re.compile(r"^samples-(\d{6})\.tar$")

log = logging.getLogger(LOG_NAME)


def sample_key(index: int) -> str:
    return f"sample-{index:09d}"


def noise(seed: int, start: int, stop: int, latent_size: int) -> torch.Tensor:
    """The standard-normal noise of samples ``start .. stop-1`` (all latent groups), each from its own
    ``(seed, index)`` generator."""
    return torch.stack(
        [torch.randn(latent_size, generator=item_generator(seed, i)) for i in range(start, stop)]
    )


def write_shard(
    acc: Accelerator, model: VAE, out: str, index: int, params: dict[str, Any], bar: tqdm
) -> dict[str, Any]:
    """Generate shard ``index`` in memory, write it atomically, then its record; returns the record."""
    size, n = params["shard_size"], params["count"]
    lo, hi = index * size, min(n, (index + 1) * size)
    buf = io.BytesIO()
    tar = TarWriter(buf)  # type: ignore[arg-type]
    for start in range(lo, hi, params["batch_size"]):
        stop = min(hi, start + params["batch_size"])
        eps = noise(params["seed"], start, stop, model.latent_size)
        with acc.autocast():
            images = figures.to_uint8_nhwc(
                figures.generate_from(model, eps, params["temperature"], acc.device)
            )
        for i, image in zip(range(start, stop), images, strict=True):
            tar.add(f"{sample_key(i)}.{ENCODING}", encode_image(image, ENCODING))
        bar.update(stop - start)
    tar.close()
    name = shard_name(SPLIT, index)
    storage.atomic_write_bytes(storage.join(out, name), buf.getvalue())
    record = {"name": name, "count": hi - lo, "bytes": tar.pos, "sha256": tar.sha.hexdigest(), "args": params}
    storage.atomic_write_json(_record_path(out, index), record)
    return record


def _record_path(out: str, index: int) -> str:
    return storage.join(out, PARTS, shard_name(SPLIT, index).replace(".tar", ".json"))


def read_record(out: str, index: int, params: dict[str, Any]) -> dict[str, Any] | None:
    """The shard's record if one was written for these arguments, else None."""
    try:
        record = storage.read_json(_record_path(out, index))
    except (OSError, ValueError):
        return None  # missing or torn
    return record if isinstance(record, dict) and record.get("args") == params else None


def done_record(out: str, index: int, params: dict[str, Any]) -> dict[str, Any] | None:
    """The shard's record if the shard is complete for these arguments (its bytes re-hashed), else None."""
    record = read_record(out, index, params)
    if record is None:
        return None
    shard = storage.join(out, record["name"])
    try:
        intact = storage.size(shard) == record["bytes"] and sha256_file(shard) == record["sha256"]
    except OSError:
        intact = False
    return record if intact else None


def _entries(out: str) -> list[str]:
    if not storage.is_url(out) and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a directory: choose another --out")
    return sorted(storage.listdir(out))


def check_out(out: str) -> None:
    """Refuse an output that holds anything but an earlier (possibly partial) sample set."""
    for entry in _entries(out):
        ours = (
            entry in (MANIFEST, GRID, PARTS)
            or _SHARD_RE.match(entry)
            or ".tmp" in entry  # atomic-write leftovers
        )
        if not ours:
            raise UsageError(
                f"--out {out} holds files vaejob.sample did not write ({entry!r}): choose an empty or new --out"
            )
    manifest = storage.join(out, MANIFEST)
    if storage.exists(manifest):
        try:
            splits = storage.read_json(manifest).get("splits") or {}
        except (OSError, ValueError, AttributeError):
            splits = {}
        if SPLIT not in splits:
            raise UsageError(f"--out {out} holds another kind of shard set: choose an empty or new --out")


def finish(out: str, params: dict[str, Any], model: VAE, num_shards: int) -> dict[str, Any]:
    """Rank 0, after every shard is written: drop leftovers of a larger earlier set, write the manifest last,
    then the grid (read back through the loader, which checks the set is usable)."""
    records = [read_record(out, i, params) for i in range(num_shards)]  # each owner rank checked its bytes
    missing = [shard_name(SPLIT, i) for i, r in enumerate(records) if r is None]
    if missing:
        raise RuntimeError(f"shards {missing} are missing or damaged after generation")
    for entry in _entries(out):
        m = _SHARD_RE.match(entry)
        if m and int(m.group(1)) >= num_shards:
            storage.remove(storage.join(out, entry))
            storage.remove(_record_path(out, int(m.group(1))))
    manifest = build_manifest(
        source=f"{PROG}:{params['checkpoint']}",
        seed=params["seed"],
        encoding=ENCODING,
        image_shape=model.image_shape,
        splits={SPLIT: [r for r in records if r]},
        args=params,
        extra={k: params[k] for k in ("count", "temperature", "step", "checkpoint")},
    )
    write_manifest(out, manifest)  # local: fsyncs the shard renames first
    first = next(
        iter(
            make_loader(
                out, SPLIT, min(GRID_SIZE, params["count"]), rank=0, world_size=1, num_workers=0, raw=True
            )
        )
    )
    grid = plots.make_grid(
        first["image"].permute(0, 2, 3, 1).numpy(), nrow=math.ceil(math.sqrt(len(first["image"])))
    )
    storage.atomic_write_bytes(storage.join(out, GRID), plots.to_png(grid))
    return manifest


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = run_parser(
        PROG,
        "Generate samples from a trained run as a shard set (run under `accelerate launch` to split the work).",
        "accelerate launch -m vaejob.sample --run runs/fashion_mnist --num 100000 --out s3://b/samples",
    )
    p.add_argument("--num", type=int_type(1), required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output directory or fsspec URL (s3://..., memory://...)")
    p.add_argument(
        "--batch-size", type=int_type(1), default=256, help="images decoded per batch (default 256)"
    )
    p.add_argument("--seed", type=int_type(0), default=0, help="latent seed (default 0)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="prior std scale (default 1.0)")
    p.add_argument(
        "--shard-size",
        type=int_type(1),
        default=DEFAULT_SHARD_SIZE,
        help=f"samples per shard (default {DEFAULT_SHARD_SIZE})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        model, cfg, step, ckpt, weights = load_model(args.run, args.checkpoint, weights=args.weights)
        prepare_storage(cfg, {"--out": args.out})
        check_out(args.out)
    except UserError as e:
        return report(PROG, e)
    # Everything that shapes the bytes; a shard record with other arguments is regenerated.
    params = {
        "checkpoint": str(ckpt),
        "weights": weights,
        "checkpoint_sha256": sha256_file(
            os.path.join(str(ckpt), EMA_FILE if weights == "ema" else WEIGHTS_FILE)
        ),
        "step": step,
        "count": args.num,
        "seed": args.seed,
        "temperature": args.temperature,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "mixed_precision": cfg.train.mixed_precision,
    }
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    model.to(acc.device)
    rank, world = acc.process_index, acc.num_processes
    num_shards = math.ceil(args.num / args.shard_size)
    mine = [i for i in range(rank, num_shards, world)]
    if acc.is_main_process:
        manifest = storage.join(args.out, MANIFEST)
        if storage.exists(manifest) and storage.read_json(manifest).get("args") != params:
            storage.remove(manifest)  # first: a set being rewritten must never look complete
        storage.makedirs(args.out)
    acc.wait_for_everyone()
    todo = [i for i in mine if done_record(args.out, i, params) is None]
    start = time.perf_counter()
    total = sum(min(args.num, (i + 1) * args.shard_size) - i * args.shard_size for i in todo)
    with tqdm(
        total=total,
        unit="img",
        desc=f"vaejob.sample rank {rank}",
        disable=None if acc.is_main_process else True,
    ) as bar:
        for i in todo:
            write_shard(acc, model, args.out, i, params, bar)
    log.info(
        f"rank {rank}: generated {len(todo)} of its {len(mine)} shard(s) ({len(mine) - len(todo)} already complete) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    acc.wait_for_everyone()
    if acc.is_main_process:
        finish(args.out, params, model, num_shards)
        log.info(f"{args.num} samples in {num_shards} shard(s) -> {args.out}")
    acc.wait_for_everyone()
    acc.end_training()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
