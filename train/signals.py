"""Graceful stop on SIGTERM / SIGUSR1 (preemption, Slurm's `--signal`, a user's `kill`).

The handler only sets a flag. The loop asks `should_stop()` at each step boundary; with several
processes, one all-reduce (on a CPU gloo group, so it never waits on a GPU stream) makes every
rank agree, so all of them save the same checkpoint and exit together.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self) -> None:
        self.received: int | None = None
        self._group = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """Collective when distributed: every rank must call it at the same step."""
        local = self.received is not None
        if self._group is None:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
