"""Fault injection, to exercise the recovery paths at an exact moment instead of racing a timer.

Off unless one of these environment variables is set (the tests set them):

    TRAIN_FAULT_SIGNAL=STEP:RANK:NAME   after optimizer step STEP, process RANK sends itself the
                                        signal NAME (e.g. 3:1:USR1, as a preemption would);
                                        RANK `launcher`: rank 0 sends it to its launcher
                                        (torchrun / train.launch), as a scheduler would
    TRAIN_FAULT_STALL=STEP              after optimizer step STEP, every rank waits (at most two
                                        minutes) for a stop signal: a run that cannot finish
                                        before the scheduler's signal reaches it
    TRAIN_FAULT_KILL_IN_SAVE=STEP       the main process SIGKILLs itself in the middle of saving
                                        the checkpoint of step STEP (files written, not complete)
    TRAIN_FAULT_NONFINITE=STEP          the loss of optimizer step STEP is made infinite (an
                                        overflow: the step must be skipped and counted)
"""

from __future__ import annotations

import os
import signal
import time


def after_step(step: int, rank: int, stop) -> None:
    """`stop` is the run's StopFlag."""
    if os.environ.get("TRAIN_FAULT_STALL") == str(step):
        for _ in range(1200):  # a count, not a clock: every rank leaves at the same iteration
            if stop.should_stop():  # collective: the ranks wait in step
                break
            time.sleep(0.1)
    value = os.environ.get("TRAIN_FAULT_SIGNAL")
    if value:
        at_step, target, name = value.split(":")
        signum = getattr(signal, "SIG" + name.upper().removeprefix("SIG"))
        if step != int(at_step):
            return
        if target == "launcher" and rank == 0:
            os.kill(os.getppid(), signum)
        elif target != "launcher" and rank == int(target):
            os.kill(os.getpid(), signum)


def during_save(step: int) -> None:
    if os.environ.get("TRAIN_FAULT_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def poisoned(loss, step: int):
    """The loss, made infinite at the step TRAIN_FAULT_NONFINITE names."""
    if os.environ.get("TRAIN_FAULT_NONFINITE") == str(step):
        return loss * float("inf")
    return loss
