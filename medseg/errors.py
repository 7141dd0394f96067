"""Errors that cross layers and that the CLI reports as one line (no traceback)."""

from __future__ import annotations

__all__ = ["TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a finite number; the run is failed, no model kept."""
