"""`python -m train.launch [torchrun options] -m train CONFIG [key=value ...]`: torchrun with the
trainer's exit codes.

torchrun reports any worker's non-zero exit as its own failure (exit 1 and a ChildFailedError
summary), so to a scheduler or a person a graceful stop looks like a crash. This runs torchrun's
own launcher (same options, same behaviour) and exits with what the run means:

    3  stopped by a signal (SIGUSR1/SIGTERM to any worker, or SIGTERM to this launcher, which
       passes it to the workers): every worker saved the same complete checkpoint
    N  the status the first failing worker exited with (2 bad input, 4 diverged, 5 machine)
    0  finished

The workers tell it about a graceful stop through a file (TRAIN_STOPPED_MARKER) that the main
worker writes once the checkpoint is complete.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from train.errors import (EXIT_BAD_INPUT, EXIT_BUG, EXIT_DIVERGED, EXIT_ENVIRONMENT,
                          EXIT_STOPPED_BY_SIGNAL)

MARKER = "TRAIN_STOPPED_MARKER"
DOCUMENTED = {EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_ENVIRONMENT}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="train-launch-") as tmp:
        marker = Path(tmp) / "stopped"
        os.environ[MARKER] = str(marker)  # the workers inherit it
        try:
            run(args)
            return 0
        except ChildFailedError as exc:
            if marker.exists():
                print(marker.read_text().strip(), file=sys.stderr)
                return EXIT_STOPPED_BY_SIGNAL
            rank, status = failing_worker(exc)
            print(f"error: worker rank {rank} exited with status {status}; its output above "
                  "says why", file=sys.stderr)
            return status if status > 0 else EXIT_BUG
        except SignalException as exc:
            if marker.exists():
                print(marker.read_text().strip(), file=sys.stderr)
                return EXIT_STOPPED_BY_SIGNAL
            print(f"error: the launcher got signal {exc.sigval} and the workers stopped "
                  "before saving a checkpoint", file=sys.stderr)
            return 128 + int(exc.sigval)


def failing_worker(exc) -> tuple[int, int]:
    """(rank, exit status) of the worker whose failure explains the run's: the first that
    exited with a documented status (bad input, diverged, machine), else the first to fail.
    When one rank fails, the others often fail a moment later on a broken collective (as a
    crash, status 1); which of them torchrun sees first is a race."""
    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
    documented = [(rank, f.exitcode) for rank, f in failures if f.exitcode in DOCUMENTED]
    return documented[0] if documented else (failures[0][0], failures[0][1].exitcode)


def note_stopped(message: str) -> None:
    """Main worker: tell the launcher (if it is train.launch) that the run stopped on a signal
    with a complete checkpoint."""
    path = os.environ.get(MARKER)
    if path:
        Path(path).write_text(message + "\n")


if __name__ == "__main__":
    sys.exit(main())
