"""The training job: ``accelerate launch vaejob/train.py --config configs/fashion_mnist.yaml [key=value ...]``.

Also ``python vaejob/train.py`` / ``python -m vaejob.train`` (one process). Every launcher (accelerate, torchrun,
``slurm/train.sh``, ``launch/submit.py``) ends up in ``run(cfg)``; distributed set-up comes from the environment.
The job itself is ``vaejob.trainer.Trainer``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

if __package__ in (None, ""):  # `python vaejob/train.py` / `accelerate launch vaejob/train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vaejob.cli import (
    EXIT_OK,
    ArgumentParser,
    JobFailure,
    UserError,
    env_rank,
    exit_with,
    report,
    setup_logging,
)
from vaejob.config import Config, load_config, prepare_storage
from vaejob.shards import ShardSet, open_shards
from vaejob.trainer import Trainer

PROG = "vaejob.train"
__all__ = ["Trainer", "add_job_arguments", "build_parser", "main", "run"]


def run(cfg: Config, shards: ShardSet | None = None) -> dict[str, Any]:
    """Train to ``cfg.train.max_steps`` (or until a stop signal); returns a summary with the exit code."""
    trainer = Trainer(cfg, shards)
    code = trainer.fit()
    return {"exit_code": code, "step": trainer.step, "run_dir": cfg.run.dir, "val": trainer.last_val}


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job's own arguments, shared by every launcher's parser (``launch/submit.py`` adds its flags)."""
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Train a VAE on a vaejob shard set (run under `accelerate launch` for multi-GPU/multi-node).",
        epilog="Example: accelerate launch vaejob/train.py --config configs/fashion_mnist.yaml train.max_steps=2000",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_job_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return EXIT_OK
        # Fail fast, before models start.
        prepare_storage(cfg, {"data.shards": cfg.data.shards, "samples.root": cfg.samples.root})
        shards = open_shards(cfg.data.shards, verify=cfg.data.verify, **cfg.data.target())
        summary = run(cfg, shards)
    except (UserError, JobFailure) as e:
        return report(PROG, e)
    if summary["exit_code"] == EXIT_OK and summary["val"] and env_rank() == 0:
        v = summary["val"]
        print(
            json.dumps({"step": summary["step"], "val_nelbo": round(v["nelbo"], 3), "run_dir": cfg.run.dir})
        )
    return summary["exit_code"]


if __name__ == "__main__":
    exit_with(main())
