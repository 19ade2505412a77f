"""The stop protocol: one stop request per job, agreed on by every rank at a step boundary.

SIGTERM and SIGUSR1 (what Slurm sends before preemption or the time limit; ``slurm/train.sh`` forwards its
batch shell's USR1 to every rank) set the request; so does the death of the process that launched this rank
(a killed ``accelerate launch``: the ranks must not train on alone), and launchers that receive another
signal call ``request_stop`` (``launch/submit.py``: submitit's SIGUSR2). At every step boundary the ranks
take the largest request over a CPU group, so one signalled rank stops them all at the same step; the
trainer then checkpoints and exits ``EXIT_PREEMPTED``. ``abort`` is the stronger request: stop at once and
write nothing (this job has lost its run dir to another writer).

``python -m vaejob.preempt CMD ...`` runs a launcher (``accelerate launch``) with SIGTERM/SIGUSR1 blocked, so
only the training ranks act on them: torch's elastic agent would otherwise forward a SIGTERM and SIGKILL the
ranks 30 s later, checkpoint written or not (it re-registers its handler whatever ``trap`` or
``TORCHELASTIC_SIGNALS_TO_HANDLE`` said). A blocked signal stays blocked across exec on every POSIX system, so
this holds for every torch version; ``StopRequest.installed`` unblocks them in each rank.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vaejob.cli import LOG_NAME
from vaejob.ranks import CpuGroup

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CONTINUE, STOP, ABORT = 0, 1, 2  # what the ranks agree on at a step boundary
PARENT_POLL_S = 1.0

log = logging.getLogger(LOG_NAME)
_active: StopRequest | None = None  # the request whose handlers are installed (one training per process)


class StopRequest:
    """One per training process; ``agreed`` is a collective over ``group``."""

    def __init__(self, group: CpuGroup, announce: bool = True) -> None:
        self.group, self.announce = group, announce
        self.level = CONTINUE
        self.reason = ""

    def request(self, reason: str, level: int = STOP) -> None:
        if level > self.level:
            self.level, self.reason = level, reason
            if self.announce:
                action = (
                    "stopping now, writing nothing" if level == ABORT else "checkpointing after this step"
                )
                log.info(f"{reason}: {action}")

    def agreed(self) -> int:
        """Collective: the strongest request of any rank (CONTINUE, STOP or ABORT); once there is one, every
        rank also takes the requesting rank's reason (status.json says why the job stopped)."""
        level = self.group.max(self.level)
        if level > CONTINUE:
            reasons = self.group.gather(self.reason if self.level == level else "")
            self.level, self.reason = level, next((r for r in reasons if r), self.reason)
        return level

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """While the block runs, SIGTERM/SIGUSR1 and the launcher's death set this request; the previous
        handlers and signal mask come back after."""
        global _active

        def on_signal(signum: int, frame: Any) -> None:
            self.request(f"received {signal.Signals(signum).name}")

        old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by a guarded launcher
        stop_watching = _watch_parent(self) if _launched() else None
        _active = self
        try:
            yield self
        finally:
            _active = None
            if stop_watching is not None:
                stop_watching.set()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            for s, handler in old.items():
                signal.signal(s, handler)


def request_stop(reason: str) -> bool:
    """Ask the training running in this process to stop at a checkpoint; False when none is running."""
    if _active is None:
        return False
    _active.request(reason)
    return True


def _launched() -> bool:
    """Whether a launcher (accelerate / torchrun's agent) started this rank: its death must stop us."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def _watch_parent(request: StopRequest) -> threading.Event:
    """A thread that turns the launcher's death (we are re-parented) into a stop request. Polling, not
    PR_SET_PDEATHSIG: that fires when the *thread* that forked us ends, which need not be the launcher."""
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(PARENT_POLL_S):
            if os.getppid() != parent:
                request.request(f"the launcher (pid {parent}) exited")
                return

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    return done


def main(argv: list[str] | None = None) -> int:
    """``python -m vaejob.preempt CMD [ARGS ...]``: exec CMD with SIGTERM and SIGUSR1 blocked."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(
            "usage: python -m vaejob.preempt CMD [ARGS ...]  (runs CMD with SIGTERM/SIGUSR1 blocked)",
            file=sys.stderr,
        )
        return 2
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)  # an ignored signal is never pending: the ranks would not see it
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"vaejob.preempt: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
