"""A cross-validation's ensemble: its fold models and the postprocessing decided on the
pooled cases (``ensemble.json`` of a ``medseg evaluate`` run; ``medseg predict --ensemble``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.inference.postprocess import check_postprocessing
from medseg.io.jsonfile import read_json, write_json

__all__ = ["Ensemble"]


@dataclass(frozen=True)
class Ensemble:
    """Models whose probabilities are averaged, and the postprocessing of the result.

    Attributes
    ----------
    models : tuple of str
        Model URIs (``runs:/<fold run>/model``) or ``.keras`` paths.
    postprocessing : dict or None
        A :func:`~medseg.inference.postprocess.decide_postprocessing` decision.
    """

    models: tuple[str, ...]
    postprocessing: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"models": list(self.models), "postprocessing": self.postprocessing}

    @classmethod
    def from_dict(cls, values: Any, where: str = "ensemble") -> Ensemble:
        """Read an ensemble; ``where`` (the file) names it in errors."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
        models = values.get("models")
        if not isinstance(models, list) or not models or not all(
            isinstance(m, str) and m for m in models
        ):
            raise ValueError(f"{where}: 'models' must list at least one model, got {models!r}")
        decision = values.get("postprocessing")
        if decision is not None:
            decision = check_postprocessing(decision, f"{where}: 'postprocessing'")
        return cls(tuple(models), decision)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ensemble:
        return cls.from_dict(read_json(path, "ensemble file"), where=f"ensemble file {path}")
