"""User-facing errors: each names what is wrong and how to fix it, and carries its exit status.

The command line prints a `VaedrawError` as one line and exits with its `exit_code`; anything else is
a bug and keeps its traceback. The codes are distinct so that scripts can tell the outcomes apart
(the table is in docs/ROBUSTNESS.md, Exit codes).
"""

EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: a bug, reported with its traceback
EXIT_USAGE = 2  # a bad option, config key or value (argparse uses 2 too)
EXIT_DIVERGED = 3  # the loss became non-finite; the last good checkpoint is kept
EXIT_DATA = 4  # data missing, corrupt, inconsistent with the run, or not downloadable
EXIT_CHECKPOINT = 5  # a run directory or checkpoint is missing, corrupt or incompatible
EXIT_OUTPUT = 6  # a file or folder could not be read or written (space, permissions, wrong kind)
EXIT_LOCKED = 7  # another trainer holds the run directory
EXIT_SERVE = 8  # the web server could not start (address in use, bad host)
EXIT_WORKER = 9  # a data-parallel worker died
EXIT_SIGNAL_BASE = 128  # stopped by a signal after saving a checkpoint: 128 + the signal number (130, 143)


class VaedrawError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option)."""

    exit_code = EXIT_USAGE


class ConfigError(VaedrawError):
    """A config key, value or preset is unknown or has the wrong type."""

    exit_code = EXIT_USAGE


class DataError(VaedrawError):
    """A dataset file is missing, corrupt or inconsistent, or could not be fetched."""

    exit_code = EXIT_DATA


class CheckpointError(VaedrawError):
    """A run directory or checkpoint is missing, corrupt or incompatible."""

    exit_code = EXIT_CHECKPOINT


class OutputError(VaedrawError):
    """A path could not be read or written: no space, no permission, a folder where a file belongs."""

    exit_code = EXIT_OUTPUT


class RunLocked(VaedrawError):
    """Another `vaedraw train` is writing this run directory."""

    exit_code = EXIT_LOCKED


class ServeError(VaedrawError):
    """The web explorer could not start."""

    exit_code = EXIT_SERVE


class WorkerFailed(VaedrawError):
    """A data-parallel worker process ended abnormally."""

    exit_code = EXIT_WORKER


class TrainingDiverged(VaedrawError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class TrainingInterrupted(VaedrawError):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved; `exit_code` is 128 + the signal number.
    The message is not an error: it says where the run stopped and the command that continues it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_SIGNAL_BASE + signum
