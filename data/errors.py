"""Errors for bad input: each names the file and, where there is one, the line."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Input that cannot be used as it is; str() reads `path:line: message`."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.message = message
        location = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{location}: {message}")


class ConceptFileError(DataError):
    """A concept (ground-truth) file that breaks the format or names images that are not there."""


class ImageReadError(DataError):
    """An image that is empty, truncated, not an image, or too large to decode safely."""


class SubmissionError(DataError):
    """A submission file that breaks the challenge rules."""
