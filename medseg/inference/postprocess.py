"""Postprocessing of predicted label maps: drop connected components that validation shows
to be false.

Two rules per class, both decided from validation predictions against their truth, the way
nnU-Net decides its largest-component rule:

- keep only the largest component (one organ per case);
- drop the components smaller than a volume in mm³. This removes a small false structure
  on a case without the class (a false tumour on a tumour-free kidney), which keeping the
  largest component cannot, and keeps every real lesion of a multi-lesion case.

Each validation case is reduced once to a :class:`Components` table per class (the size of
every predicted component and its overlap with the truth), from which the Dice of any rule
follows without relabelling. A class is postprocessed only when a rule strictly raises its
mean Dice over the validation cases; a tie keeps the raw prediction. The decision is a small
JSON-able dict, saved with the run (in its ``plan.json``) and applied by prediction with
`apply_postprocessing`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.io.jsonfile import read_json, write_json

__all__ = [
    "Components",
    "apply_postprocessing",
    "component_tables",
    "decide_postprocessing",
    "describe_postprocessing",
    "drop_small_components",
    "keep_largest_component",
    "load_postprocessing",
    "save_postprocessing",
]

DECISION_KEY = "keep_largest_component"
MIN_VOLUME_KEY = "min_component_mm3"
# a volume threshold never exceeds this share of the smallest true component seen in
# validation: it is fitted on few cases and must not remove the real lesions of others
MAX_THRESHOLD_SHARE = 0.5


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask (one any() per axis: faster than find_objects)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def _label(mask: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray, int]:
    """26-connected components of a non-empty mask, labelled inside its bounding box only
    (so the cost follows the structure's size, not the image's)."""
    box = _bounding_box(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask[box], structure)
    return box, components, count


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
        box, components, count = _label(mask)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        region = cleaned[box]
        region[(components > 0) & (components != int(np.argmax(sizes)))] = background
    return cleaned


def drop_small_components(
    labels: np.ndarray,
    min_voxels: Mapping[int, float],
    background: int = 0,
) -> np.ndarray:
    """Remove the connected components of each class smaller than its voxel count.

    Parameters
    ----------
    labels : ndarray of int
        Label map.
    min_voxels : dict of int to float
        Per label, the smallest component size kept (in voxels; from mm³ divide by the
        voxel volume).
    background : int, optional
        Label given to the removed voxels.

    Returns
    -------
    cleaned : ndarray
        A copy of ``labels`` (26-connected components, as `keep_largest_component`).
    """
    labels = np.asarray(labels)
    cleaned = labels.copy()
    for c, limit in min_voxels.items():
        mask = labels == int(c)
        if not mask.any():
            continue
        box, components, _ = _label(mask)
        sizes = np.bincount(components.ravel())
        small = sizes < limit
        small[0] = False
        region = cleaned[box]
        region[small[components]] = background
    return cleaned


@dataclass(frozen=True)
class Components:
    """One class of one validation case, reduced to what a removal rule's Dice needs.

    Attributes
    ----------
    sizes : tuple of int
        Voxels of each 26-connected component of the prediction.
    overlaps : tuple of int
        Of each of those, the voxels inside the truth.
    truth_sizes : tuple of int
        Voxels of each component of the truth.
    voxel_mm3 : float
        Volume of one voxel.
    """

    sizes: tuple[int, ...]
    overlaps: tuple[int, ...]
    truth_sizes: tuple[int, ...]
    voxel_mm3: float

    def dice(self, keep: np.ndarray | None = None) -> float:
        """Dice after keeping the components flagged in ``keep`` (all by default).

        A case without the class scores 1 when nothing is kept and 0 otherwise, so that
        removing a false structure there counts for a rule (unlike the NaN of the reported
        per-case metric, which would drop the case from the mean).
        """
        sizes, overlaps = np.asarray(self.sizes, float), np.asarray(self.overlaps, float)
        if keep is not None:
            sizes, overlaps = sizes[keep], overlaps[keep]
        total = sizes.sum() + sum(self.truth_sizes)
        return 1.0 if total == 0 else 2.0 * overlaps.sum() / total

    def largest(self) -> np.ndarray:
        keep = np.zeros(len(self.sizes), bool)
        if self.sizes:
            keep[int(np.argmax(self.sizes))] = True
        return keep

    def at_least(self, mm3: float) -> np.ndarray:
        return np.asarray(self.sizes, float) * self.voxel_mm3 >= mm3

    def to_dict(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes),
            "overlaps": list(self.overlaps),
            "truth_sizes": list(self.truth_sizes),
            "voxel_mm3": self.voxel_mm3,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Components:
        return cls(
            tuple(int(v) for v in values["sizes"]),
            tuple(int(v) for v in values["overlaps"]),
            tuple(int(v) for v in values["truth_sizes"]),
            float(values["voxel_mm3"]),
        )


def component_tables(
    pred: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[int, Components]:
    """Reduce one case to a :class:`Components` table per class.

    Parameters
    ----------
    pred, truth : ndarray of int
        Predicted and true label maps of the same shape.
    classes : sequence of int
        Foreground labels.
    spacing : sequence of float, optional
        Voxel size in mm (for the volume rule).

    Returns
    -------
    tables : dict of int to Components
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    tables = {}
    for c in classes:
        p, t = pred == c, truth == c
        sizes = overlaps = truth_sizes = ()
        if p.any():
            box, components, count = _label(p)
            sizes = tuple(int(v) for v in np.bincount(components.ravel(), minlength=count + 1)[1:])
            inside = components[t[box]]
            overlaps = tuple(int(v) for v in np.bincount(inside, minlength=count + 1)[1:])
        if t.any():
            _, components, count = _label(t)
            truth_sizes = tuple(
                int(v) for v in np.bincount(components.ravel(), minlength=count + 1)[1:]
            )
        tables[int(c)] = Components(sizes, overlaps, truth_sizes, voxel_mm3)
    return tables


def _volume_thresholds(tables: Sequence[Components]) -> list[float]:
    """Candidate volume thresholds: between consecutive predicted component volumes
    (geometric midpoints), below the cap set by the smallest true component."""
    truth = [s * t.voxel_mm3 for t in tables for s in t.truth_sizes]
    if not truth:  # the class never appears: nothing says how large it may be
        return []
    cap = MAX_THRESHOLD_SHARE * min(truth)
    volumes = sorted({s * t.voxel_mm3 for t in tables for s in t.sizes})
    midpoints = [math.sqrt(a * b) for a, b in zip(volumes, volumes[1:], strict=False)]
    return [v for v in midpoints if v <= cap] + ([cap] if volumes and volumes[0] < cap else [])


def decide_postprocessing(
    per_case: Sequence[Mapping[int, Components]],
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Decide per class which removal rule, if any, raises the validation Dice.

    Parameters
    ----------
    per_case : sequence of dict
        `component_tables` of every validation case.
    class_names : sequence of str, optional
        Names of the labels (background first), recorded in the decision for readers.

    Returns
    -------
    decision : dict
        ``{"keep_largest_component": [labels], "min_component_mm3": {label: mm3},
        "classes": {label: {"name", "rule", "dice_before", "dice_after", "n", "apply"}}}``.
        Per class the rule with the highest mean Dice (`Components.dice`) wins when it is
        strictly above the raw prediction's; between equal rules the milder wins (a lower
        volume before a higher one, either before keeping the largest component only).
        Volume thresholds are tried between the predicted components' volumes, up to half
        the smallest true component seen. Keys of ``min_component_mm3`` and ``classes`` are
        strings after a JSON round trip, which `apply_postprocessing` accepts.
    """
    labels = sorted({int(c) for case in per_case for c in case})
    classes: dict[int, dict[str, Any]] = {}
    largest, volumes = [], {}
    for c in labels:
        tables = [case[c] for case in per_case if c in case]
        before = float(np.mean([t.dice() for t in tables]))
        best = ("none", before, None)
        for mm3 in _volume_thresholds(tables):
            score = float(np.mean([t.dice(t.at_least(mm3)) for t in tables]))
            if score > best[1]:
                best = ("min_volume", score, mm3)
        score = float(np.mean([t.dice(t.largest()) for t in tables]))
        if score > best[1]:
            best = ("largest", score, None)
        rule, after, mm3 = best
        entry = {
            "rule": rule,
            "dice_before": before,
            "dice_after": after,
            "n": len(tables),
            "apply": rule != "none",
        }
        if rule == "min_volume":
            entry["min_component_mm3"] = volumes[c] = float(mm3)
        elif rule == "largest":
            largest.append(c)
        if class_names is not None and c < len(class_names):
            entry = {"name": str(class_names[c]), **entry}
        classes[c] = entry
    return {DECISION_KEY: largest, MIN_VOLUME_KEY: volumes, "classes": classes}


def apply_postprocessing(
    labels: np.ndarray,
    decision: Mapping[str, Any] | None,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Apply a postprocessing decision to a predicted label map.

    Parameters
    ----------
    labels : ndarray of int
        Predicted label map (apply it on the final, original-grid prediction).
    decision : dict or None
        From `decide_postprocessing` or `load_postprocessing`; ``None`` means no
        postprocessing.
    spacing : sequence of float, optional
        Voxel size in mm; required when the decision has a volume rule.

    Returns
    -------
    labels : ndarray
        ``labels`` cleaned by the decision's rules (a copy; the input itself when nothing is
        to be done).
    """
    if not decision:
        return labels
    if DECISION_KEY not in decision:
        raise ValueError(f"postprocessing decision has no {DECISION_KEY!r} entry: {decision}")
    largest = [int(c) for c in decision[DECISION_KEY]]
    volumes = {int(c): float(v) for c, v in (decision.get(MIN_VOLUME_KEY) or {}).items()}
    if largest:
        labels = keep_largest_component(labels, largest)
    if volumes:
        if spacing is None:
            raise ValueError(
                f"postprocessing decision drops components below {volumes} mm³: "
                "the image's spacing is needed"
            )
        voxel_mm3 = float(np.prod([float(s) for s in spacing]))
        labels = drop_small_components(labels, {c: v / voxel_mm3 for c, v in volumes.items()})
    return labels


def describe_postprocessing(decision: Mapping[str, Any] | None) -> str:
    """One line naming each postprocessed class and its rule, e.g.
    ``tumour: drop components < 912 mm³ (Dice 0.53 → 0.80 on validation)``."""
    if not decision:
        return "none"
    info = {str(k): v for k, v in (decision.get("classes") or {}).items()}
    rules = [(int(c), "keep the largest component") for c in decision.get(DECISION_KEY, [])]
    rules += [
        (int(c), f"drop components < {float(v):.0f} mm³")
        for c, v in (decision.get(MIN_VOLUME_KEY) or {}).items()
    ]
    if not rules:
        return "none (no rule raised the validation Dice)"
    parts = []
    for c, rule in sorted(rules):
        entry = info.get(str(c), {})
        text = f"{entry.get('name', f'label {c}')}: {rule}"
        if "dice_before" in entry:
            text += f" (Dice {entry['dice_before']:.3f} → {entry['dice_after']:.3f} on validation)"
        parts.append(text)
    return "; ".join(parts)


def save_postprocessing(decision: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a decision as JSON (atomically)."""
    return write_json(path, decision, sort_keys=True, allow_nan=True)


def check_postprocessing(decision: Any, where: str) -> dict[str, Any]:
    """The decision if it has the form `apply_postprocessing` needs, else a ValueError
    naming ``where`` (the file) and the entry."""
    if not isinstance(decision, dict) or not isinstance(decision.get(DECISION_KEY), list):
        raise ValueError(f"{where} has no {DECISION_KEY!r} list")
    if not all(isinstance(c, int) and c > 0 for c in decision[DECISION_KEY]):
        raise ValueError(
            f"{where}: {DECISION_KEY!r} must list foreground labels, got {decision[DECISION_KEY]}"
        )
    volumes = decision.get(MIN_VOLUME_KEY) or {}
    if not isinstance(volumes, dict) or not all(
        str(c).isdigit() and int(c) > 0 and isinstance(v, int | float) and math.isfinite(v) and v >= 0
        for c, v in volumes.items()
    ):
        raise ValueError(
            f"{where}: {MIN_VOLUME_KEY!r} must map foreground labels to volumes ≥ 0 mm³, "
            f"got {volumes!r}"
        )
    return decision


def load_postprocessing(path: str | os.PathLike) -> dict[str, Any]:
    """Read a decision written by `save_postprocessing`, checking its form."""
    decision = read_json(path, "postprocessing file")
    return check_postprocessing(decision, f"postprocessing file {path}")
