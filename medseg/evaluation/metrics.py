"""Overlap metrics of a predicted label map against the ground truth, and their summaries.

Empty regions follow nnU-Net's convention: when a class (or region) is absent from both the
prediction and the ground truth, its Dice is undefined and reported as NaN, and summaries
ignore it (``nanmean``). A class predicted but absent from the ground truth (or the reverse)
scores 0. Other challenges differ (BraTS scores an empty-vs-empty case 1), so NaN keeps the
choice explicit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from numbers import Real

import numpy as np

__all__ = ["dice_per_class", "dice_region", "summarize"]


def _dice(pred_mask: np.ndarray, truth_mask: np.ndarray) -> float:
    intersection = np.count_nonzero(pred_mask & truth_mask)
    total = np.count_nonzero(pred_mask) + np.count_nonzero(truth_mask)
    if total == 0:
        return math.nan
    return 2.0 * intersection / total


def _is_number(value: object) -> bool:
    return isinstance(value, Real | np.number) and not isinstance(value, bool | np.bool_)


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return pred, truth


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Dice coefficient of each class, each class taken on its own.

    Parameters
    ----------
    pred, truth : ndarray of int
        Label maps of the same shape.
    classes : sequence of int
        Labels to score.

    Returns
    -------
    dice : dict of int to float
        ``2 |P & T| / (|P| + |T|)`` per class, where ``P`` and ``T`` are the voxels labelled
        with the class; NaN when the class is absent from both maps (nnU-Net's convention),
        0 when it is in only one of them.

    Examples
    --------
    >>> dice_per_class(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), [1, 2, 3])
    {1: 0.6666666666666666, 2: 0.6666666666666666, 3: nan}
    """
    pred, truth = _check_shapes(pred, truth)
    return {int(c): _dice(pred == c, truth == c) for c in classes}


def dice_region(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> float:
    """Dice coefficient of a region made of several labels.

    Parameters
    ----------
    pred, truth : ndarray of int
        Label maps of the same shape.
    labels : sequence of int
        Labels forming the region, e.g. ``(1, 2)`` for KiTS's kidney-and-tumour region.

    Returns
    -------
    dice : float
        Dice of the voxels whose label is in ``labels``; NaN when the region is empty in
        both maps.
    """
    pred, truth = _check_shapes(pred, truth)
    labels = np.asarray(list(labels))
    return _dice(np.isin(pred, labels), np.isin(truth, labels))


def summarize(per_case: list[dict[str, float]]) -> dict[str, dict]:
    """Summary statistics of per-case metrics.

    Parameters
    ----------
    per_case : list of dict
        One dict of metrics per case, e.g. ``{"dice_kidney": 0.9, "dice_tumor": nan}``.
        Non-numeric entries (a case id, say) are skipped; a key missing from a case counts
        as NaN for that case.

    Returns
    -------
    summary : dict of str to dict
        For each metric, ``{"mean", "median", "std", "n"}``: NaN-ignoring mean, median and
        (population) standard deviation, and the number of non-NaN cases. Statistics of a
        metric with no non-NaN value are NaN.
    """
    keys: list[str] = []
    for case in per_case:
        for key, value in case.items():
            if _is_number(value) and key not in keys:
                keys.append(key)
    summary = {}
    for key in keys:
        values = np.array(
            [float(v) if _is_number(v := case.get(key)) else math.nan for case in per_case]
        )
        with warnings.catch_warnings():
            # all-NaN metrics (a class absent from every case) legitimately give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            summary[key] = {
                "mean": float(np.nanmean(values)),
                "median": float(np.nanmedian(values)),
                "std": float(np.nanstd(values)),
                "n": int(np.count_nonzero(~np.isnan(values))),
            }
    return summary
