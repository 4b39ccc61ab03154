"""User-facing errors: each names what is wrong and how to fix it.

The command line prints a `VaedrawError` as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class VaedrawError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option)."""


class DataError(VaedrawError):
    """A dataset file is missing, corrupt or inconsistent, or could not be fetched."""


class ConfigError(VaedrawError):
    """A config key, value or preset is unknown or has the wrong type."""


class CheckpointError(VaedrawError):
    """A run directory or checkpoint is missing, corrupt or incompatible."""
