"""Evaluate a trained run: ``accelerate launch -m vaejob.evaluate --run RUN_DIR`` (or ``python -m``).

Exact over a whole split: each rank reads a disjoint slice (``make_loader``'s val layout, padding dropped),
and the sums of ``vaejob.metrics.elbo_pass`` are all-reduced. Every random draw of a sample (the one-sample
-ELBO's z, then the importance samples) comes from a CPU generator seeded by ``(--seed, sample key)``, so
the numbers do not depend on the rank count, the batch size or the device, up to float rounding.

Reports -ELBO, the importance-weighted NLL bound with K samples, bits/dim, reconstruction, KL (total and per
dimension), active units and per-class -ELBO, labelled with what the nats are (``metrics.nll_labels``: the
likelihood, the run's ``data.binarize``; a binarised run is measured on the fixed per-key draw); writes ``RUN_DIR/eval/<split>-step_XXXXXXXX.json`` (prefixed
``<shard set>-`` for ``--shards``), prints the same JSON, logs it to the run's W&B run and draws latent
traversals and interpolations beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from vaejob import figures, plots, storage
from vaejob.checkpoint import load_model, run_target
from vaejob.cli import (
    EXIT_OK,
    LOG_NAME,
    UsageError,
    UserError,
    exit_with,
    int_type,
    positive_float,
    report,
    run_parser,
    setup_logging,
)
from vaejob.config import Config, prepare_storage
from vaejob.fid import NETWORKS, FidEvaluator, fid_settings
from vaejob.loader import Batch, make_loader
from vaejob.loader.binarize import eval_binarize
from vaejob.metrics import IW_CHUNK, KeyedNoise, elbo_pass, iw_log_px, nll_labels, per_image_noise
from vaejob.models import VAE
from vaejob.ranks import CpuGroup
from vaejob.rundir import RunDir, step_dir_name
from vaejob.shards import ShardSet, open_shards
from vaejob.tracking import attach, require_wandb_key

PROG = "vaejob.evaluate"
DEFAULT_IW_SAMPLES = 1000
# Images per decoder pass of the IW estimate (bounds its memory). A GPU wants big passes; on a CPU a pass of a few
# hundred stays in cache: measured on the 2-core box, hvae at K=100, 40 images took 23 s with 4096 and 9-10 s
# with 200-400 (the same values: each image's noise stream does not depend on the pass it is in).
DEFAULT_IW_BATCH_CPU = 256
DEFAULT_IW_BATCH_GPU = 4096


def default_iw_batch(device: torch.device) -> int:
    return DEFAULT_IW_BATCH_CPU if device.type == "cpu" else DEFAULT_IW_BATCH_GPU


TRAVERSAL_DIMS = 10  # rows of the traversal plot: the dimensions with the largest KL
EVAL_FORMAT = "vaejob-eval/1"

log = logging.getLogger(LOG_NAME)


def evaluate(
    acc: Accelerator,
    model: VAE,
    cfg: Config,
    shards: ShardSet,
    split: str,
    *,
    k: int,
    batch_size: int,
    seed: int,
    iw_batch: int | None = None,
) -> tuple[dict[str, Any], Tensor]:
    """Collective. Returns the metrics (identical on every rank) and, on rank 0, the first valid images of
    the split (for the plots)."""
    model.eval()
    loader = make_loader(
        shards,
        split,
        batch_size,
        seed=seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        num_workers=cfg.data.num_workers,
        raw=True,
        with_keys=True,
        binarize=eval_binarize(cfg.data.binarize),  # a binarised run: the fixed per-key draw, as in training
        device=acc.device,
    )
    rows = max(1, (iw_batch or default_iw_batch(acc.device)) // min(k, IW_CHUNK))
    first: list[Tensor] = []

    def keep_first(x: Tensor) -> None:
        if acc.is_main_process and len(first) < figures.INTERP_PAIRS * 2:
            first.extend(x.cpu())

    noise = KeyedNoise(seed)

    def nll(model: VAE, x: Tensor) -> Tensor:
        gens = noise.generators  # each image's noise stream continues after its one-sample z
        parts = [
            iw_log_px(model, x[i : i + rows], k, noise=per_image_noise(gens[i : i + rows]))
            for i in range(0, len(x), rows)
        ]
        return -torch.cat(parts)

    with loader:
        sums = elbo_pass(
            acc,
            model,
            _progress(acc, loader, f"{PROG} {split}"),
            cfg.loss,
            noise,
            shards.num_classes,
            nll=nll,
            on_images=keep_first,
        )
    metrics = sums.result(model.image_shape, shards.label_names, model.likelihood.discrete)
    return metrics, torch.stack(first) if first else torch.zeros(0)


def _progress(acc: Accelerator, loader: Any, desc: str) -> Iterator[Batch]:
    from tqdm import tqdm

    with tqdm(
        total=len(loader), desc=desc, unit="batch", disable=None if acc.is_main_process else True
    ) as bar:
        for batch in loader:
            bar.update(1)
            yield batch


def write_plots(
    model: VAE, images: Tensor, kl_per_dim: Sequence[float], out_stem: str, device: torch.device
) -> dict[str, Any]:
    """Latent traversal (top dims by KL) around the first image, interpolations between image pairs: for a
    model with one latent vector (a hierarchical one has none to walk along)."""
    grids: dict[str, Any] = {}
    if not model.single_latent:
        log.info(
            f"traversal and interpolation plots skipped: the model has {len(model.latent_groups)} latent groups"
        )
        return grids
    if len(images):
        dims = sorted(range(len(kl_per_dim)), key=lambda i: -kl_per_dim[i])[:TRAVERSAL_DIMS]
        grids["traversal"] = figures.latent_traversal(model, images[0], dims, device=device)
    if len(images) >= 2:
        grids["interpolation"] = figures.interpolation_grid(model, images, device=device)
    for name, grid in grids.items():
        storage.atomic_write_bytes(f"{out_stem}-{name}.png", plots.to_png(grid))
    return grids


def build_parser() -> argparse.ArgumentParser:
    p = run_parser(
        PROG,
        "Evaluate a trained run on a whole split (run under `accelerate launch` for several processes).",
        "accelerate launch -m vaejob.evaluate --run runs/fashion_mnist --iw-samples 1000",
    )
    p.add_argument("--split", default="val", help="val (default) or test, or any non-train split of --shards")
    p.add_argument("--shards", help="evaluate on another shard set with the same image size")
    p.add_argument(
        "--iw-samples",
        type=int_type(1),
        default=DEFAULT_IW_SAMPLES,
        help=f"importance samples K of the NLL bound (default {DEFAULT_IW_SAMPLES})",
    )
    p.add_argument("--batch-size", type=int_type(1), help="images per batch (default: train.batch_size)")
    p.add_argument(
        "--iw-batch",
        type=int_type(1),
        help=f"images decoded per pass of the NLL bound, bounds memory (default "
        f"{DEFAULT_IW_BATCH_CPU} on a CPU, {DEFAULT_IW_BATCH_GPU} on a GPU)",
    )
    p.add_argument("--seed", type=int_type(0), default=0, help="noise seed (default 0)")
    p.add_argument(
        "--fid", type=int_type(0), default=0, help="FID and KID of N generated samples (default 0: off)"
    )
    p.add_argument(
        "--fid-real", type=int_type(1), help="real images FID compares with (default: the whole split)"
    )
    p.add_argument(
        "--fid-network", choices=NETWORKS, help="Inception weights' source (default: the run's fid.network)"
    )
    p.add_argument(
        "--fid-temperature",
        type=positive_float,
        nargs="+",
        default=[1.0],
        metavar="T",
        help="prior std scale of the FID samples; several: fid_by_temperature has each (default 1.0)",
    )
    p.add_argument("--fid-weights", help="pt_inception-2015-12-05-6726825d.pth for clusters without internet")
    p.add_argument(
        "--fid-cache", help="real-image statistics cache (default: the run's fid.cache, ~/.cache/vaejob/fid)"
    )
    return p


def _prepare(args: argparse.Namespace) -> tuple[VAE, Config, int, str, ShardSet]:
    """Everything that can fail on user input, before any process group or device work."""
    # Another set is brought to the shape the run trained on (its data.image_size / resize / channels).
    if args.shards:
        storage.check_access(args.shards, "--shards")
    eval_shards = open_shards(args.shards, **run_target(args.run)) if args.shards else None
    try:
        model, cfg, step, ckpt, weights = load_model(args.run, args.checkpoint, weights=args.weights)
    except UserError:
        if eval_shards is None:
            raise
        # The training shards may be gone: the strict weight load still catches most size mismatches.
        model, cfg, step, ckpt, weights = load_model(
            args.run, args.checkpoint, eval_shards.image_shape, args.weights
        )
    prepare_storage(cfg, {})  # the run's retry policy for what follows
    shards = eval_shards or open_shards(cfg.data.shards, **cfg.data.target())
    if shards.image_shape != model.image_shape:
        c, h, w = shards.image_shape
        mc, mh, mw = model.image_shape
        raise UsageError(
            f"--shards {shards.root} holds {c}x{h}x{w} images but the model was trained on {mc}x{mh}x{mw}; "
            "shard the evaluation set with the same --size and --channels (or index it: data.image_size applies)"
        )
    if args.split == "train":
        raise UsageError("--split train is read shuffled with a dropped remainder; evaluate val or test")
    if args.split not in shards.splits:
        names = ", ".join(shards.splits)
        raise UsageError(
            f"this shard set ({shards.root}) has splits {names}; use --split val or --shards DIR"
        )
    if shards.split(args.split).count == 0:  # nothing to average over (e.g. a --train-only set's val)
        raise UsageError(
            f"the {args.split} split of {shards.root} holds no images; evaluate another --split or --shards"
        )
    args.weights = weights  # the ones loaded
    return model, cfg, step, ckpt, shards


def fid_metrics(
    acc: Accelerator, args: argparse.Namespace, cfg: Config, model: VAE, shards: ShardSet
) -> dict[str, Any]:
    """Collective: FID/KID of ``--fid`` samples against the split's real images, with the time it took."""
    start = time.perf_counter()
    settings = fid_settings(cfg.fid)
    settings.update(
        {
            k: v
            for k, v in (
                ("network", args.fid_network),
                ("weights", args.fid_weights),
                ("cache_dir", args.fid_cache),
            )
            if v
        }
    )
    fid = FidEvaluator(acc, CpuGroup(acc.num_processes), **settings)
    # The same latents at every temperature, so the temperatures differ by their scale alone.
    records = [
        fid.evaluate(model, shards, args.split, args.fid, args.fid_real, seed=args.seed, temperature=t)
        for t in args.fid_temperature
    ]
    record: dict[str, Any] = {**records[0], "fid_temperature": args.fid_temperature[0]}
    if len(records) > 1:
        record["fid_by_temperature"] = {
            str(t): {k: r[k] for k in ("fid", "kid_mean", "kid_std")}
            for t, r in zip(args.fid_temperature, records, strict=True)
        }
    return {**record, "fid_seconds": time.perf_counter() - start}


def refuse(acc: Accelerator, error: UserError) -> int:
    """A refusal every rank reached together: leave the process group before exiting. A gloo group still
    alive at interpreter exit can abort a rank (SIGABRT, "terminate called without an active exception")."""
    acc.end_training()
    return report(PROG, error)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        model, cfg, step, ckpt, shards = _prepare(args)
    except UserError as e:
        return report(PROG, e)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    main_rank = acc.is_main_process
    try:
        require_wandb_key(cfg, CpuGroup(acc.num_processes), main_rank)  # every rank stops, not rank 0 alone
    except UserError as e:
        return refuse(acc, e)
    tracker = attach(cfg, main_rank)
    model.to(acc.device)
    start = time.perf_counter()
    metrics, images = evaluate(
        acc,
        model,
        cfg,
        shards,
        args.split,
        k=args.iw_samples,
        batch_size=args.batch_size or cfg.train.batch_size,
        seed=args.seed,
        iw_batch=args.iw_batch,
    )
    if args.fid:
        try:
            metrics.update(fid_metrics(acc, args, cfg, model, shards))
        except UserError as e:  # no FID network: one line, after the -ELBO pass's own output
            return refuse(acc, e)
    record = {
        "format": EVAL_FORMAT,
        "run_dir": args.run,
        "checkpoint": ckpt,
        "step": step,
        "split": args.split,
        "shards": shards.root,
        "iw_samples": args.iw_samples,
        "seed": args.seed,
        "weights": args.weights,
        **nll_labels(cfg.loss.likelihood, model.likelihood.discrete, cfg.data.binarize),
        **metrics,
    }
    if main_rank:
        name = f"{args.split}-{step_dir_name(step)}"
        if args.shards:
            name = f"{os.path.basename(shards.root.rstrip('/'))}-{name}"
        stem = os.path.join(RunDir(args.run).eval, name)
        storage.atomic_write_json(f"{stem}.json", record)
        grids = write_plots(model, images, metrics.get("kl_per_dim", []), stem, acc.device)
        tracker.log_eval(record, grids)
        tracker.finish()
        log.info(
            f"evaluated {record['count']} images of {shards.root} {args.split} at step {step} on "
            f"{acc.num_processes} process(es) in {time.perf_counter() - start:.1f}s -> {stem}.json"
        )
        print(json.dumps(record, indent=2, sort_keys=True))
    acc.wait_for_everyone()
    acc.end_training()
    return EXIT_OK


if __name__ == "__main__":
    exit_with(main())
