"""The stop protocol: one stop request per job, agreed on by every rank at a step boundary.

SIGTERM and SIGUSR1 (what Slurm sends before preemption or the time limit; ``slurm/train.sh`` forwards its
batch shell's USR1 to every rank) set the request; launchers that receive another signal turn it into the
same request with ``request_stop`` (``launch/submit.py``: submitit's SIGUSR2). At every step boundary the
ranks all-reduce the flag (MAX) over a CPU (gloo) group, so one signalled rank stops them all at the same
step without a GPU sync; the trainer then checkpoints and exits ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from vaejob.cli import LOG_NAME

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

log = logging.getLogger(LOG_NAME)
_active: StopRequest | None = None  # the request whose handlers are installed (one training per process)


class StopRequest:
    """Construct on every rank at the same point (with several ranks on NCCL it creates a gloo group)."""

    def __init__(self, world: int, announce: bool = True) -> None:
        self.world, self.announce = world, announce
        self.requested = False
        self.group = None
        if world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # the flag stays on the CPU: no GPU sync per step

    def request(self, reason: str) -> None:
        if not self.requested and self.announce:
            log.info(f"received {reason}: checkpointing after this step")
        self.requested = True

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank has a request."""
        if self.world == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """SIGTERM/SIGUSR1 set this request while the block runs; the previous handlers come back after."""
        global _active

        def on_signal(signum: int, frame: Any) -> None:
            self.request(signal.Signals(signum).name)

        old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        _active = self
        try:
            yield self
        finally:
            _active = None
            for s, handler in old.items():
                signal.signal(s, handler)


def request_stop(reason: str) -> bool:
    """Ask the training running in this process to stop at a checkpoint; False when none is running."""
    if _active is None:
        return False
    _active.request(reason)
    return True
