"""Evaluate a trained run: ``accelerate launch -m vaejob.evaluate --run RUN_DIR`` (or ``python -m``).

Exact over a whole split: each rank reads a disjoint slice (``make_loader``'s val layout, padding masked),
per-image values are summed in float64 and all-reduced. Every random draw of a sample (the one-sample
-ELBO's z, then the importance samples) comes from a CPU generator seeded by ``(--seed, sample key)``, so
the numbers do not depend on the rank count, the batch size or the device, up to float rounding.

Reports -ELBO (one z per image, analytic KL), the importance-weighted NLL bound (Burda et al. 2016) with K
samples, bits/dim, reconstruction, KL (total and per dimension), active units and per-class -ELBO; writes
``RUN_DIR/eval/<split>-step_XXXXXXXX.json`` (prefixed ``<shard set>-`` for ``--shards``), prints the same
JSON, logs it to the run's W&B run and draws latent traversals and interpolations beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from vaejob import plots, samples, storage
from vaejob.checkpoint import CheckpointError, latest_checkpoint, load_model
from vaejob.config import Config, LossConfig
from vaejob.data import DataError, ShardSet, make_loader, open_shards
from vaejob.loss import bits_per_dim, reconstruction_nats, vae_loss
from vaejob.model import VAE
from vaejob.shard import UsageError, _int_type, _Parser
from vaejob.tracking import Tracker, new_run_id
from vaejob.train import ACTIVE_UNIT_THRESHOLD, EXIT_OK, EXIT_USAGE

DEFAULT_IW_SAMPLES = 1000
IW_CHUNK = 100  # importance samples per image per decoder pass; fixed, as it shapes the noise stream
DEFAULT_IW_BATCH = 4096  # images per decoder pass of the IW estimate: bounds its memory
TRAVERSAL_DIMS = 10  # rows of the traversal plot: the dimensions with the largest KL
EVAL_FORMAT = "vaejob-eval/1"

log = logging.getLogger("vaejob")


# ------------------------------------------------------------------------------------------- estimator
@torch.no_grad()
def iw_log_px(
    model: VAE,
    x: Tensor,
    loss_cfg: LossConfig,
    k: int,
    *,
    generators: Sequence[torch.Generator],
    chunk: int = IW_CHUNK,
) -> Tensor:
    """Importance-weighted estimate of log p(x) per image, float64 (N,) nats:
    ``logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log k`` with z_k ~ q(z|x).

    ``x`` is N×C×H×W in [0, 1]; image ``i``'s noise comes from ``generators[i]`` (CPU), drawn ``chunk``
    samples at a time, so the result is a function of (model, x, generator states, k, chunk). Memory holds
    N×chunk decoded images; the log-sum-exp runs over chunks in float64.
    """
    if len(generators) != len(x) or k < 1 or chunk < 1:
        raise ValueError(
            f"need one generator per image, k >= 1 and chunk >= 1 (got {len(generators)}, {k}, {chunk})"
        )
    mu, logvar = (t.float() for t in model.encode(x))
    std = torch.exp(0.5 * logvar)
    n, d = mu.shape
    total = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        eps = torch.stack([torch.randn(c, d, generator=g) for g in generators]).to(x.device)  # (N, c, D)
        z = mu[:, None] + std[:, None] * eps
        logits = model.decode(z.reshape(n * c, d))
        x_rep = x[:, None].expand(n, c, *x.shape[1:]).reshape(n * c, *x.shape[1:])
        log_px_z = -reconstruction_nats(logits, x_rep, loss_cfg).view(n, c)
        # log p(z) - log q(z|x) for diagonal Gaussians; the (2 pi) terms cancel.
        log_prior_ratio = 0.5 * (eps.pow(2) + logvar[:, None] - z.pow(2)).sum(-1)
        log_w = (log_px_z + log_prior_ratio).double()
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=1))
    return total - math.log(k)


# ------------------------------------------------------------------------------------------- the job
class _Sums:
    """Float64 per-rank sums, all-reduced in one collective."""

    SCALARS = ("count", "recon", "kl", "nelbo", "nll")

    def __init__(self, latent_dim: int, num_classes: int, device: torch.device) -> None:
        z = dict(dtype=torch.float64, device=device)
        self.scalars = torch.zeros(len(self.SCALARS), **z)
        self.kl_dim, self.mu, self.mu_sq = (torch.zeros(latent_dim, **z) for _ in range(3))
        self.class_nelbo, self.class_count = torch.zeros(num_classes, **z), torch.zeros(num_classes, **z)

    def parts(self) -> list[Tensor]:
        return [self.scalars, self.kl_dim, self.mu, self.mu_sq, self.class_nelbo, self.class_count]

    def reduce(self, acc: Accelerator) -> None:
        flat = acc.reduce(torch.cat(self.parts()), reduction="sum")
        for part, new in zip(self.parts(), flat.split([p.numel() for p in self.parts()]), strict=True):
            part.copy_(new)


@torch.no_grad()
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
    iw_batch: int = DEFAULT_IW_BATCH,
) -> tuple[dict[str, Any], Tensor]:
    """Collective. Returns the metrics (identical on every rank) and, on rank 0, the first valid images of
    the split (for the plots)."""
    device = acc.device
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
    )
    d, num_classes = model.latent_dim, shards.num_classes
    sums = _Sums(d, num_classes, device)
    first: list[Tensor] = []
    rows = max(1, iw_batch // min(k, IW_CHUNK))
    progress = _progress(acc, len(loader), f"vaejob.evaluate {split}")
    for batch in loader:
        keep = batch["valid"].nonzero().flatten()
        progress.update(1)
        if len(keep) == 0:
            continue
        x = batch["image"][keep].to(device).float().div_(255.0)
        labels = batch["label"][keep].to(device)
        gens = [samples.item_generator(seed, batch["key"][i]) for i in keep.tolist()]
        if acc.is_main_process and len(first) < samples.INTERP_PAIRS * 2:
            first.extend(x.cpu())
        with acc.autocast():
            mu, logvar = model.encode(x)
            eps = torch.stack([torch.randn(d, generator=g) for g in gens]).to(device)
            logits = model.decode(mu.float() + torch.exp(0.5 * logvar.float()) * eps)
            log_px = torch.cat(
                [
                    iw_log_px(model, x[i : i + rows], cfg.loss, k, generators=gens[i : i + rows])
                    for i in range(0, len(x), rows)
                ]
            )
        out = vae_loss(logits, x, mu, logvar, cfg.loss, 1.0)
        nelbo = out.nelbo.double()
        per_image = (torch.ones_like(nelbo), out.recon.double(), out.kl.double(), nelbo, -log_px)
        sums.scalars += torch.stack([v.sum() for v in per_image])
        sums.kl_dim += out.kl_per_dim.double().sum(0)
        sums.mu += mu.double().sum(0)
        sums.mu_sq += mu.double().pow(2).sum(0)
        labelled = labels >= 0
        if num_classes and labelled.any():
            sums.class_nelbo.index_add_(0, labels[labelled], nelbo[labelled])
            sums.class_count.index_add_(0, labels[labelled], torch.ones_like(nelbo[labelled]))
    progress.close()
    loader.close()
    sums.reduce(acc)
    return _metrics(sums, shards, model), torch.stack(first) if first else torch.zeros(0)


def _metrics(sums: _Sums, shards: ShardSet, model: VAE) -> dict[str, Any]:
    totals = dict(zip(_Sums.SCALARS, sums.scalars.tolist(), strict=True))
    n = totals["count"]
    mean = {key: totals[key] / n for key in _Sums.SCALARS[1:]}
    var = sums.mu_sq / n - (sums.mu / n) ** 2
    record: dict[str, Any] = {
        "count": int(n),
        "nelbo": mean["nelbo"],
        "recon": mean["recon"],
        "kl": mean["kl"],
        "iw_nll": mean["nll"],
        "bits_per_dim": bits_per_dim(mean["nll"], model.image_shape),
        "nelbo_bits_per_dim": bits_per_dim(mean["nelbo"], model.image_shape),
        "active_units": int((var > ACTIVE_UNIT_THRESHOLD).sum().item()),
        "latent_dim": model.latent_dim,
        "kl_per_dim": (sums.kl_dim / n).tolist(),
    }
    counts = sums.class_count.tolist()
    if any(counts):
        names = (shards.manifest.get("labels") or {}).get("names") or [str(c) for c in range(len(counts))]
        record["per_class"] = {
            str(name): {"count": int(c), "nelbo": s / c}
            for name, c, s in zip(names, counts, sums.class_nelbo.tolist(), strict=True)
            if c
        }
    return record


def _progress(acc: Accelerator, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=None if acc.is_main_process else True)


# ------------------------------------------------------------------------------------------- outputs
def write_plots(
    model: VAE, images: Tensor, kl_per_dim: Sequence[float], out_stem: str, device: torch.device
) -> dict[str, Any]:
    """Latent traversal (top dims by KL) around the first image, interpolations between image pairs."""
    grids: dict[str, Any] = {}
    if len(images):
        dims = sorted(range(len(kl_per_dim)), key=lambda i: -kl_per_dim[i])[:TRAVERSAL_DIMS]
        grids["traversal"] = samples.latent_traversal(model, images[0], dims, device=device)
    if len(images) >= 2:
        grids["interpolation"] = samples.interpolation_grid(model, images, device=device)
    for name, grid in grids.items():
        storage.atomic_write_bytes(f"{out_stem}-{name}.png", plots.to_png(grid))
    return grids


def log_to_wandb(tracker: Tracker, record: dict[str, Any], grids: dict[str, Any]) -> None:
    if tracker.wandb is None:
        return
    prefix = f"eval/{record['split']}"
    payload: dict[str, Any] = {
        f"{prefix}/{key}": value
        for key, value in record.items()
        if isinstance(value, int | float) and key not in ("step", "seed")
    }
    for name, stats in record.get("per_class", {}).items():
        payload[f"{prefix}/nelbo/{name}"] = stats["nelbo"]
    payload["trainer/step"] = record["step"]
    tracker.wandb.log(payload)
    tracker.log_images(record["step"], {f"eval_{record['split']}_{k}": v for k, v in grids.items()})


def open_tracker(cfg: Config, main: bool) -> Tracker:
    """The run's W&B run (same id, ``resume="allow"``, the config's mode) on rank 0; metrics.jsonl is left
    alone (the eval JSON files are the record)."""
    id_file = os.path.join(cfg.run.dir, "wandb_id.txt")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else new_run_id()
    tracker = Tracker(cfg, run_id, enabled=main, resume_step=None, write_metrics=False)
    return tracker


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vaejob.evaluate",
        description="Evaluate a trained run on a whole split (run under `accelerate launch` for several processes).",
        epilog="Example: accelerate launch -m vaejob.evaluate --run runs/fashion_mnist --iw-samples 1000",
    )
    p.add_argument("--run", required=True, help="the training run dir (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="a checkpoint dir (default: the run's newest complete one)")
    p.add_argument("--split", default="val", help="val (default) or test, or any non-train split of --shards")
    p.add_argument("--shards", help="evaluate on another shard set with the same image size")
    p.add_argument(
        "--iw-samples",
        type=_int_type(1),
        default=DEFAULT_IW_SAMPLES,
        help=f"importance samples K of the NLL bound (default {DEFAULT_IW_SAMPLES})",
    )
    p.add_argument("--batch-size", type=_int_type(1), help="images per batch (default: train.batch_size)")
    p.add_argument(
        "--iw-batch",
        type=_int_type(1),
        default=DEFAULT_IW_BATCH,
        help=f"images decoded per pass of the NLL bound, bounds memory (default {DEFAULT_IW_BATCH})",
    )
    p.add_argument("--seed", type=_int_type(0), default=0, help="noise seed (default 0)")
    return p


def _prepare(args: argparse.Namespace) -> tuple[VAE, Config, int, str, ShardSet]:
    """Everything that can fail on user input, before any process group or device work."""
    ckpt = args.checkpoint or latest_checkpoint(args.run)
    eval_shards = open_shards(args.shards) if args.shards else None
    try:
        model, cfg, step = load_model(args.run, ckpt)
    except CheckpointError:
        if eval_shards is None:
            raise
        # The training shards may be gone: the strict weight load still catches most size mismatches.
        model, cfg, step = load_model(args.run, ckpt, eval_shards.image_shape)
    shards = eval_shards or open_shards(cfg.data.shards)
    if shards.image_shape != model.image_shape:
        c, h, w = shards.image_shape
        mc, mh, mw = model.image_shape
        raise UsageError(
            f"--shards {shards.root} holds {c}x{h}x{w} images but the model was trained on {mc}x{mh}x{mw}; "
            "shard the evaluation set with the same --size and --channels"
        )
    if args.split == "train":
        raise UsageError("--split train is read shuffled with a dropped remainder; evaluate val or test")
    if args.split not in shards.splits:
        names = ", ".join(shards.splits)
        raise UsageError(
            f"this shard set ({shards.root}) has splits {names}; use --split val or --shards DIR"
        )
    return model, cfg, step, str(ckpt), shards


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vaejob %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
        model, cfg, step, ckpt, shards = _prepare(args)
    except (UsageError, CheckpointError, DataError) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # one line per job, not per rank
            print(f"vaejob.evaluate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    main_rank = acc.is_main_process
    try:
        tracker = open_tracker(cfg, main_rank)
    except RuntimeError as e:  # wandb.mode=online without a key
        print(f"vaejob.evaluate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
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
    record = {
        "format": EVAL_FORMAT,
        "run_dir": args.run,
        "checkpoint": ckpt,
        "step": step,
        "split": args.split,
        "shards": shards.root,
        "iw_samples": args.iw_samples,
        "seed": args.seed,
        **metrics,
    }
    if main_rank:
        name = f"{args.split}-step_{step:08d}"
        if args.shards:
            name = f"{os.path.basename(shards.root.rstrip('/'))}-{name}"
        stem = os.path.join(args.run, "eval", name)
        storage.atomic_write_json(f"{stem}.json", record)
        grids = write_plots(model, images, metrics["kl_per_dim"], stem, acc.device)
        log_to_wandb(tracker, record, grids)
        if tracker.wandb is not None:
            tracker.wandb.finish()
        log.info(
            f"evaluated {record['count']} images of {shards.root} {args.split} at step {step} on "
            f"{acc.num_processes} process(es) in {time.perf_counter() - start:.1f}s -> {stem}.json"
        )
        print(json.dumps(record, indent=2, sort_keys=True))
    acc.wait_for_everyone()
    acc.end_training()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
