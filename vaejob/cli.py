"""What every vaejob command shares: exit codes, the user-error type, argument types, logging, error lines.

Every command (``vaejob.train|shard|evaluate|sample``, ``launch/submit.py``) reports a problem with its input
as ONE line ``<prog>: error: <what> ...; <the fix>`` on stderr and exits ``EXIT_USAGE``; under several
processes only rank 0 prints it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1  # a crash: a traceback says why
EXIT_USAGE = 2  # bad config, flags or data: one line says what and how to fix it
EXIT_NONFINITE = 3  # the loss went non-finite; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # stopped at a checkpoint by SIGTERM/SIGUSR1: launchers requeue on it (EX_TEMPFAIL)

LOG_NAME = "vaejob"


class UserError(Exception):
    """A problem with what the user gave (config, flags, data, run dir); the message is one line naming the
    thing and the fix. Every subclass means exit ``EXIT_USAGE``."""


class UsageError(UserError):
    """Bad command-line flags or output location."""


class JobFailure(Exception):
    """The job cannot go on (disk full, storage gone, a rank lost, the run dir taken by another job): one line
    naming what failed and why, exit ``EXIT_FAILED``; ``status.json`` records the same line."""


def error_line(e: BaseException) -> str:
    """An exception as one line: ``PATH: reason`` for OS errors, else ``Type: first line of the message``."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror} (errno {e.errno})"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line, exit 2 through ``report``) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def int_type(minimum: int, maximum: int | None = None) -> Any:
    """An argparse ``type`` accepting integers in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    return parse


def float_type(ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse ``type`` accepting numbers for which ``ok`` holds; ``expected`` describes them."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


fraction = float_type(lambda v: 0.0 <= v < 1.0, "a number in [0, 1), e.g. 0.1")
positive_float = float_type(lambda v: v > 0 and math.isfinite(v), "a number > 0")


def run_parser(prog: str, description: str, example: str) -> ArgumentParser:
    """The parser of a command that reads a trained run (evaluate, sample): ``--run DIR [--checkpoint DIR]``."""
    p = ArgumentParser(prog=prog, description=description, epilog=f"Example: {example}")
    p.add_argument("--run", required=True, help="the training run dir (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="a checkpoint dir (default: the run's newest complete one)")
    p.add_argument(
        "--weights",
        choices=("auto", "ema", "raw"),
        default="auto",
        help="the checkpoint's averaged (ema) or optimizer (raw) weights; auto = ema when it has them",
    )
    return p


def env_rank() -> int:
    """This process's global rank as the launchers export it (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def report(prog: str, error: BaseException) -> int:
    """Print ``error`` as the command's one error line (rank 0 only: one line per job); returns the exit
    code: ``EXIT_FAILED`` for a ``JobFailure``, else ``EXIT_USAGE``."""
    if env_rank() == 0:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return EXIT_FAILED if isinstance(error, JobFailure) else EXIT_USAGE


def exit_with(code: int) -> NoReturn:
    """End a command's process with ``code``. A failing rank first ignores SIGTERM: torch's elastic agent
    (``accelerate launch``) SIGTERMs the other ranks as soon as one exits, which would turn their own exit
    code (every rank's 2 after a refusal they agreed on) into -15 while they are on their way out."""
    if code != EXIT_OK:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def setup_logging() -> logging.Logger:
    """vaejob's own handler on its own logger: a launcher's logging (submitit's) is left as it is."""
    log = logging.getLogger(LOG_NAME)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s vaejob %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    return log
