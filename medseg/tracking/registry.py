"""The MLflow model registry as its users expect: each new version gets an alias.

A version registered by a training run (``tracking.register_model=NAME``) carries its
validation score as the version tag ``medseg.val_dice_macro``: the mean over the validation
cases' ``dice_*`` summary means (classes and regions, NaN ignored; higher is better). The
version with the best score holds ``@champion``; a new version that does not beat it gets
``@challenger`` (the alias moves to the newest challenger). So
``models:/NAME@champion`` is always the best validated model and ``medseg predict --model
models:/NAME@champion`` needs no version number.
"""

from __future__ import annotations

import math

import numpy as np
from mlflow.tracking import MlflowClient

__all__ = ["CHALLENGER", "CHAMPION", "SCORE_TAG", "assign_alias", "validation_score"]

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "medseg.val_dice_macro"


def validation_score(summary: dict[str, dict]) -> float:
    """The score versions are ranked by: the mean of the ``dice_*`` means of ``summary``
    (:func:`medseg.evaluation.metrics.summarize`), NaN when there is none."""
    means = [float(s["mean"]) for k, s in summary.items() if k.startswith("dice_")]
    means = [m for m in means if math.isfinite(m)]
    return float(np.mean(means)) if means else math.nan


def assign_alias(client: MlflowClient, name: str, version: str | int, score: float) -> str:
    """Tag version ``version`` of registered model ``name`` with ``score`` and give it
    ``@champion`` when no other version scored higher (a tie goes to the newer one), else
    ``@challenger``. Returns the alias given.

    A version without a finite score (no Dice on the validation cases) never becomes the
    champion while another version has one.
    """
    version = str(version)
    client.set_model_version_tag(name, version, SCORE_TAG, repr(float(score)))
    best = -math.inf
    for other in client.search_model_versions(f"name = '{name}'"):
        if other.version == version:
            continue
        value = _score(other.tags.get(SCORE_TAG))
        if math.isfinite(value):
            best = max(best, value)
    mine = _score(repr(float(score)))
    has_champion = _has_alias(client, name, CHAMPION)
    if (math.isfinite(mine) and mine >= best) or (not has_champion and best == -math.inf):
        alias = CHAMPION
    else:
        alias = CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    return alias


def _score(text: str | None) -> float:
    try:
        return float(text) if text is not None else math.nan
    except ValueError:
        return math.nan


def _has_alias(client: MlflowClient, name: str, alias: str) -> bool:
    return alias in client.get_registered_model(name).aliases
