"""Every failure the user is meant to read, with the process exit status it maps to.

A leaf module: it imports nothing of the project, so config, data, models and the loop can all
raise these without import cycles. `python -m train` (and the other commands) print the message
as one line on stderr and exit with the status; anything else that escapes is a bug.
"""

from __future__ import annotations

import errno
import sys
import traceback

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED_BY_SIGNAL = 3
EXIT_DIVERGED = 4
EXIT_ENVIRONMENT = 5


class TrainError(Exception):
    """A failure with a message meant for the user as it is, and the exit status it means."""

    exit_code = EXIT_BUG
    prefix = "error: "

    def __init__(self, message: str, *, quiet: bool = False):
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            # Raised in a DataLoader worker and re-made here from a message that carries the
            # worker's traceback: keep the error's own line.
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)
        self.quiet = quiet  # e.g. on every rank but the first, which says it for all


class ConfigError(TrainError, ValueError):
    """Bad input: a config file, key, type or value, a data source, a path, a checkpoint to
    resume from. Raised before anything is written."""

    exit_code = EXIT_BAD_INPUT


class StoppedBySignal(TrainError):
    """SIGTERM/SIGUSR1 arrived: every rank saved the same checkpoint and the run stopped early."""

    exit_code = EXIT_STOPPED_BY_SIGNAL
    prefix = ""


class Diverged(TrainError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""

    exit_code = EXIT_DIVERGED


class EnvironmentFailure(TrainError):
    """The machine failed the run (disk full, permission, I/O error), not the input."""

    exit_code = EXIT_ENVIRONMENT


class MainProcessFailed(TrainError):
    """On the other ranks: the main process failed where they waited for it (e.g. preparing
    the data). They exit with its status, quietly: its own message says why."""

    def __init__(self, exit_code: int):
        super().__init__(f"the main process failed with status {exit_code}", quiet=True)
        self.exit_code = exit_code


# OS errors that are the machine's doing, not the program's or the input's.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES,
                      errno.EPERM}


def as_user_error(exc: BaseException) -> TrainError | None:
    """The TrainError an exception means for the user, or None for a bug."""
    if isinstance(exc, TrainError):
        return exc
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = f" ({exc.filename})" if exc.filename else ""
        return EnvironmentFailure(f"{exc.strerror}{where}; fix the machine (space, permissions, "
                                  "filesystem), then run the same command to resume")
    return None


def exit_status(exc: BaseException) -> int:
    """What a command prints for a failure, and the status it exits with: one line for bad
    input or the machine, the traceback for a bug."""
    error = as_user_error(exc)
    if error is None:
        traceback.print_exc()
        print("error: this is a bug in train (the traceback above says where); please report it",
              file=sys.stderr)
        return EXIT_BUG
    if not error.quiet:
        print(f"{error.prefix}{error}", file=sys.stderr)
    return error.exit_code
