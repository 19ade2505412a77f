"""Decisions every rank must take together, over a CPU (gloo) group: one rank's failure or choice becomes
every rank's, so no rank is left waiting in a collective the others will never reach.

With one process every function is a plain local computation.
"""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


_COLLECTIVE_MARKERS = (
    "gloo",
    "nccl",
    "timed out",
    "connection closed by peer",
    "connection reset",
    "processgroup",
)


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed: a peer lost or hung (torch raises plain RuntimeErrors)."""
    dist_error = getattr(dist, "DistError", ())
    text = str(e).lower()
    return isinstance(e, dist_error) or (
        isinstance(e, RuntimeError) and any(m in text for m in _COLLECTIVE_MARKERS)
    )


class CpuGroup:
    """The default process group when it is gloo, else a gloo group beside it (a flag on the CPU: no GPU
    sync). Construct on every rank at the same point: with several ranks on NCCL it creates a group."""

    def __init__(self, world: int, timeout: timedelta | None = None) -> None:
        self.world = world
        self.group = None
        if world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    def max(self, value: int) -> int:
        """The largest ``value`` of all ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def first_error(self, error: str | None) -> str | None:
        """None when no rank had an error, else the first one (``rank R: message`` for another rank's)."""
        if self.max(1 if error else 0) == 0:
            return None
        errors = self.gather(error)
        me = dist.get_rank() if self.world > 1 else 0
        rank, message = next((r, e) for r, e in enumerate(errors) if e)
        return message if rank == me else f"rank {rank}: {message}"

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def describe_rank(rank: int, world: int) -> str:
    """This rank in the job, as its log lines name it: global rank, machine (node) rank, host."""
    # torchrun's agent exports GROUP_RANK (its --machine_rank); submitit's tasks only have Slurm's node id.
    node = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or "0"
    local = os.environ.get("LOCAL_RANK", "0")
    return f"rank {rank}/{world} (machine {node}, local rank {local}, pid {os.getpid()}) on {socket.gethostname()}"


def replica_digest(module: torch.nn.Module) -> str:
    """A short sha256 of a module's parameters: equal on every rank while DDP keeps the replicas in step."""
    params = torch.cat([p.detach().float().cpu().flatten() for p in module.parameters()])
    return hashlib.sha256(params.numpy().tobytes()).hexdigest()[:16]
