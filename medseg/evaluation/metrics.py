"""Metrics of a predicted label map against the ground truth, and their summaries.

Empty regions follow nnU-Net's convention: when a class (or region) is absent from both the
prediction and the ground truth, its Dice is undefined and reported as NaN, and summaries
ignore it (``nanmean``). A class predicted but absent from the ground truth (or the reverse)
scores 0. Other challenges differ (BraTS scores an empty-vs-empty case 1), so NaN keeps the
choice explicit. `score_case` applies the same rule to every metric: all of a class's
metrics are NaN when it is absent from both maps (surface distances for a structure present
in only one map are described in :mod:`medseg.evaluation.surface`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

from medseg.evaluation.surface import surface_distance_metrics

__all__ = [
    "METRICS",
    "Score",
    "long_scores",
    "score_key",
    "wide_scores",
    "dice_per_class",
    "dice_region",
    "iou_per_class",
    "score_case",
    "summarize",
    "volume_difference",
]

#: Per-class metrics of `score_case`, in the order of its keys ``<metric>_<class name>``.
METRICS = (
    "dice",
    "iou",
    "hd95",
    "asd",
    "surface_dice",
    "volume_diff_mm3",
    "volume_diff_rel",
)


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


def iou_per_class(pred: np.ndarray, truth: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Intersection over union (Jaccard index) of each class.

    Parameters
    ----------
    pred, truth : ndarray of int
        Label maps of the same shape.
    classes : sequence of int
        Labels to score.

    Returns
    -------
    iou : dict of int to float
        ``|P & T| / |P | T|`` per class; NaN when the class is absent from both maps, 0 when
        it is in only one (as `dice_per_class`).
    """
    pred, truth = _check_shapes(pred, truth)
    result = {}
    for c in classes:
        p, t = pred == c, truth == c
        union = np.count_nonzero(p | t)
        result[int(c)] = math.nan if union == 0 else np.count_nonzero(p & t) / union
    return result


def volume_difference(
    pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[float, float]:
    """Signed volume difference of two binary masks, in mm³ and relative to the truth.

    Parameters
    ----------
    pred_mask, truth_mask : ndarray of bool
        Binary masks of the same shape.
    spacing : sequence of float
        Voxel spacing per axis in mm.

    Returns
    -------
    difference_mm3, relative : float
        ``V_pred - V_truth`` in mm³, and that divided by ``V_truth`` (NaN when the truth is
        empty). Both NaN when both masks are empty.
    """
    pred_mask, truth_mask = _check_shapes(pred_mask, truth_mask)
    voxel = float(np.prod(np.asarray(spacing, dtype=float)))
    n_pred, n_truth = np.count_nonzero(pred_mask), np.count_nonzero(truth_mask)
    if n_pred == 0 and n_truth == 0:
        return math.nan, math.nan
    diff = (n_pred - n_truth) * voxel
    return diff, (diff / (n_truth * voxel) if n_truth else math.nan)


def score_case(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    class_names: Sequence[str],
    regions: dict[str, Sequence[int]] | None = None,
    tolerance: float = 1.0,
    percentile: float = 95.0,
) -> dict[str, float]:
    """Every metric of one case, per foreground class (and Dice per region).

    Parameters
    ----------
    pred, truth : ndarray of int
        Label maps of the same shape on the same grid.
    spacing : sequence of float
        Voxel spacing per axis in mm.
    class_names : sequence of str
        Name of each label, background first; labels ``1 .. len - 1`` are scored.
    regions : dict of str to sequence of int, optional
        Named unions of labels scored by Dice, e.g. ``{"kidney_and_tumor": [1, 2]}``.
    tolerance : float, optional
        Surface Dice tolerance in mm.
    percentile : float, optional
        Percentile of the Hausdorff distance.

    Returns
    -------
    scores : dict of str to float
        ``<metric>_<class>`` for each metric of `METRICS` (``surface_dice`` at ``tolerance``)
        and ``dice_<region>``. Every metric of a class absent from both maps is NaN.
    """
    pred, truth = _check_shapes(pred, truth)
    scores: dict[str, float] = {}
    for label in range(1, len(class_names)):
        name = class_names[label]
        p, t = pred == label, truth == label
        surface = surface_distance_metrics(p, t, spacing, tolerance, percentile)
        diff, rel = volume_difference(p, t, spacing)
        # Dice and IoU from the same counts (one pass over the volume each)
        both, total = np.count_nonzero(p & t), np.count_nonzero(p) + np.count_nonzero(t)
        values = {
            "dice": 2.0 * both / total if total else math.nan,
            "iou": both / (total - both) if total else math.nan,
            **surface,
            "volume_diff_mm3": diff,
            "volume_diff_rel": rel,
        }
        scores.update({f"{metric}_{name}": float(values[metric]) for metric in METRICS})
    for region, labels in (regions or {}).items():
        scores[f"dice_{region}"] = float(dice_region(pred, truth, labels))
    return scores


@dataclass(frozen=True)
class Score:
    """One row of the long per-case table: a metric of a structure (a class or a region)."""

    case_id: str
    structure: str
    metric: str
    value: float


def score_key(metric: str, structure: str) -> str:
    """The key of a metric in `score_case`'s dict: ``<metric>_<structure>``."""
    return f"{metric}_{structure}"


def long_scores(
    cases: Sequence[tuple[str, Mapping[str, float]]],
    class_names: Sequence[str],
    regions: Mapping[str, Sequence[int]] | None = None,
) -> list[Score]:
    """`score_case` dicts as rows ``(case, structure, metric, value)``.

    The structures and metrics come from the class names, the regions and `METRICS`, never
    from splitting keys (``surface_dice_kidney_and_tumour`` splits more than one way).
    """
    pairs = [(name, metric) for name in class_names[1:] for metric in METRICS]
    pairs += [(region, "dice") for region in (regions or {})]
    return [
        Score(str(case_id), name, metric, float(scores[score_key(metric, name)]))
        for case_id, scores in cases
        for name, metric in pairs
        if score_key(metric, name) in scores
    ]


def wide_scores(rows: Sequence[Score]) -> dict[str, dict[str, float]]:
    """The inverse of `long_scores`: per case, the `score_case` dict."""
    cases: dict[str, dict[str, float]] = {}
    for row in rows:
        cases.setdefault(row.case_id, {})[score_key(row.metric, row.structure)] = row.value
    return cases


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
