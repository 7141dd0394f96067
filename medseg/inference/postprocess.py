"""Postprocessing of predicted label maps: keep the largest connected component per class.

Whether to apply it is decided per class from cross-validation predictions, as nnU-Net does:
a class is postprocessed only when removing all but its largest component raises its mean
Dice over the validation cases (strictly; a tie keeps the raw prediction). The decision is a
small JSON-able dict saved with the run and applied by prediction with `apply_postprocessing`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.io.atomic import write_atomically

__all__ = [
    "apply_postprocessing",
    "decide_postprocessing",
    "keep_largest_component",
    "load_postprocessing",
    "postprocessing_scores",
    "save_postprocessing",
]

DECISION_KEY = "keep_largest_component"


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask (one any() per axis: faster than find_objects)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def keep_largest_component(
    labels: np.ndarray, classes: Sequence[int], background: int = 0
) -> np.ndarray:
    """Remove all but the largest connected component of each of ``classes``.

    Parameters
    ----------
    labels : ndarray of int
        Label map.
    classes : sequence of int
        Labels to clean; other labels are left untouched.
    background : int, optional
        Label given to the removed voxels.

    Returns
    -------
    cleaned : ndarray
        A copy of ``labels``. Components are taken with full connectivity (26 neighbours in
        3D, like skimage's default); ties between equally large components keep the first in
        scan order.
    """
    labels = np.asarray(labels)
    cleaned = labels.copy()
    for c in classes:
        mask = labels == c
        if not mask.any():
            continue
        box, largest = _largest_component(mask)
        region = cleaned[box]
        region[mask[box] & ~largest] = background
    return cleaned


def _largest_component(mask: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """The bounding box of a non-empty mask and its largest 26-connected component there.

    Labelling inside the bounding box only makes the cost follow the structure's size.
    """
    box = _bounding_box(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask[box], structure)
    if count <= 1:
        return box, components > 0
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return box, components == int(np.argmax(sizes))


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    return math.nan if total == 0 else 2.0 * np.count_nonzero(pred & truth) / total


def postprocessing_scores(
    pred: np.ndarray, truth: np.ndarray, classes: Sequence[int]
) -> dict[int, tuple[float, float]]:
    """Dice of each class before and after keeping its largest component, for one case.

    Parameters
    ----------
    pred, truth : ndarray of int
        Predicted and true label maps of the same shape.
    classes : sequence of int
        Foreground labels.

    Returns
    -------
    scores : dict of int to (float, float)
        ``(dice_before, dice_after)`` per class (NaN where the class is absent from both
        maps, as `medseg.evaluation.dice_per_class`). Each class is cleaned on its own.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    scores = {}
    for c in classes:
        p, t = pred == c, truth == c
        before = _dice(p, t)
        if not p.any():
            scores[int(c)] = (before, before)
            continue
        box, largest = _largest_component(p)
        # outside the box the cleaned mask is empty; inside it, it is `largest`
        total = np.count_nonzero(largest) + np.count_nonzero(t)
        after = 2.0 * np.count_nonzero(largest & t[box]) / total
        scores[int(c)] = (before, after)
    return scores


def decide_postprocessing(
    per_case: Sequence[Mapping[int, tuple[float, float]]],
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Decide per class whether keeping the largest component improves the CV Dice.

    Parameters
    ----------
    per_case : sequence of dict
        `postprocessing_scores` of every cross-validation case.
    class_names : sequence of str, optional
        Names of the labels (background first), recorded in the decision for readers.

    Returns
    -------
    decision : dict
        ``{"keep_largest_component": [labels...], "classes": {label: {"name", "dice_before",
        "dice_after", "n", "apply"}}}``. A class is in ``keep_largest_component`` when its
        NaN-ignoring mean Dice after cleaning is strictly higher than before (nnU-Net's rule).
        Labels are JSON-safe ints; ``classes`` keys are strings after a JSON round trip,
        which `apply_postprocessing` does not need.
    """
    labels = sorted({int(c) for case in per_case for c in case})
    classes: dict[int, dict[str, Any]] = {}
    for c in labels:
        pairs = np.array([case[c] for case in per_case if c in case], dtype=float).reshape(-1, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent everywhere
            before, after = np.nanmean(pairs, axis=0)
        n = int(np.count_nonzero(~np.isnan(pairs[:, 0])))
        entry = {
            "dice_before": float(before),
            "dice_after": float(after),
            "n": n,
            "apply": bool(n > 0 and after > before),
        }
        if class_names is not None and c < len(class_names):
            entry = {"name": str(class_names[c]), **entry}
        classes[c] = entry
    return {DECISION_KEY: [c for c in labels if classes[c]["apply"]], "classes": classes}


def apply_postprocessing(labels: np.ndarray, decision: Mapping[str, Any] | None) -> np.ndarray:
    """Apply a postprocessing decision to a predicted label map.

    Parameters
    ----------
    labels : ndarray of int
        Predicted label map (any grid; apply it on the final, original-grid prediction).
    decision : dict or None
        From `decide_postprocessing` or `load_postprocessing`; ``None`` means no
        postprocessing.

    Returns
    -------
    labels : ndarray
        ``labels`` with all but the largest component removed for each class listed under
        ``"keep_largest_component"`` (a copy; the input itself when nothing is to be done).
    """
    if not decision:
        return labels
    if DECISION_KEY not in decision:
        raise ValueError(f"postprocessing decision has no {DECISION_KEY!r} entry: {decision}")
    classes = [int(c) for c in decision[DECISION_KEY]]
    return keep_largest_component(labels, classes) if classes else labels


def save_postprocessing(decision: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a decision as JSON (atomically)."""
    text = json.dumps(decision, indent=2, sort_keys=True, allow_nan=True) + "\n"
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def load_postprocessing(path: str | os.PathLike) -> dict[str, Any]:
    """Read a decision written by `save_postprocessing`, checking its form."""
    path = Path(path)
    try:
        decision = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"postprocessing file {path} is not valid JSON: {err}") from err
    if not isinstance(decision, dict) or not isinstance(decision.get(DECISION_KEY), list):
        raise ValueError(f"postprocessing file {path} has no {DECISION_KEY!r} list")
    return decision
