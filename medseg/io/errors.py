"""The error every reader and writer raises for a file it cannot use."""

from __future__ import annotations

__all__ = ["MedsegIOError"]


class MedsegIOError(ValueError):
    """A file could not be read or written; the message names the file and the problem."""
