"""Which exceptions are the user's input problems (shown as one line) rather than bugs."""

from conceptclef.core.config import ConfigError
from conceptclef.data.errors import DataError


class RunDirectoryError(ValueError):
    """A run directory that is incomplete, damaged, or made for other data."""


USER_ERRORS: tuple[type[BaseException], ...] = (DataError, ConfigError, RunDirectoryError, FileNotFoundError)
