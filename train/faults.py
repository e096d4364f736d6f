"""Fault injection, to exercise the recovery paths at an exact moment instead of racing a timer.

Off unless one of these environment variables is set (the tests set them):

    TRAIN_FAULT_SIGNAL=STEP:RANK:NAME   after optimizer step STEP, process RANK sends itself the
                                        signal NAME (e.g. 3:1:USR1, as a preemption would)
    TRAIN_FAULT_KILL_IN_SAVE=STEP       the main process SIGKILLs itself in the middle of saving
                                        the checkpoint of step STEP (files written, not complete)
"""

from __future__ import annotations

import os
import signal


def _parse_signal(value: str) -> tuple[int, int, int]:
    step, rank, name = value.split(":")
    return int(step), int(rank), getattr(signal, "SIG" + name.upper().removeprefix("SIG"))


def after_step(step: int, rank: int) -> None:
    value = os.environ.get("TRAIN_FAULT_SIGNAL")
    if value:
        at_step, at_rank, signum = _parse_signal(value)
        if (step, rank) == (at_step, at_rank):
            os.kill(os.getpid(), signum)


def during_save(step: int) -> None:
    if os.environ.get("TRAIN_FAULT_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
