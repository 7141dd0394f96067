"""The dataset fingerprint: what nnU-Net's planning needs to know about a dataset.

Computed once while a dataset is built (one case at a time) and stored with it, so
planning and preprocessing never have to read the records to learn spacings, shapes,
class frequencies or the foreground intensity distribution.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["FingerprintAccumulator", "fingerprint_hash"]

INTENSITY_KEYS = (
    "mean",
    "std",
    "min",
    "max",
    "percentile_00_5",
    "percentile_99_5",
    "median",
)


class FingerprintAccumulator:
    """Streaming dataset fingerprint, fed one case at a time.

    Memory does not grow with the number of cases apart from the per-case intensity
    sample (at most ``samples_per_case`` values) and the per-case spacing and shape.

    Parameters
    ----------
    class_names : list of str
        Names of the label values ``0 .. K-1``; index 0 is background. Foreground is
        every voxel with ``label > 0``.
    seed : int
        Seed of the foreground intensity sample; case ``i`` draws with
        ``np.random.default_rng([seed, i])`` so the result depends only on the seed and
        the case order.
    samples_per_case : int
        Foreground voxels sampled per case for the percentiles and median (nnU-Net uses
        10 000). A case with no more foreground voxels than this contributes all of them.

    Examples
    --------
    >>> acc = FingerprintAccumulator(["background", "kidney", "tumour"])
    >>> for image, label, spacing in cases:  # doctest: +SKIP
    ...     acc.add(image, label, spacing)
    >>> fingerprint = acc.result()  # doctest: +SKIP
    """

    def __init__(self, class_names: list[str], seed: int = 0, samples_per_case: int = 10000):
        if len(class_names) < 2:
            raise ValueError(f"need background and at least one class, got {class_names}")
        if samples_per_case < 1:
            raise ValueError(f"samples_per_case must be positive, got {samples_per_case}")
        self.class_names = [str(name) for name in class_names]
        self.seed = int(seed)
        self.samples_per_case = int(samples_per_case)
        self._num_classes = len(self.class_names)
        self._voxel_counts = np.zeros(self._num_classes, dtype=np.int64)
        self._case_counts = np.zeros(self._num_classes, dtype=np.int64)
        self._spacings: list[list[float]] = []
        self._shapes: list[list[int]] = []
        # foreground intensity: count, float64 sum and sum of squared deviations
        # (merged per case with Chan's formula, which stays exact where sum(x**2) would
        # cancel), extrema and the per-case samples
        self._fg_count = 0
        self._fg_sum = 0.0
        self._fg_m2 = 0.0
        self._fg_min = np.inf
        self._fg_max = -np.inf
        self._samples: list[np.ndarray] = []

    @property
    def num_cases(self) -> int:
        """Number of cases added so far."""
        return len(self._shapes)

    def add(self, image: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> None:
        """Add one case.

        Parameters
        ----------
        image : np.ndarray
            Intensities (any real dtype), same shape as ``label``.
        label : np.ndarray
            Integer labels in ``0 .. len(class_names) - 1``.
        spacing : sequence of float
            Voxel spacing in array-axis order, one value per axis of ``label``.
        """
        image = np.asarray(image)
        label = np.asarray(label)
        if image.shape != label.shape:
            raise ValueError(f"image shape {image.shape} != label shape {label.shape}")
        if label.dtype.kind not in "ui":
            raise ValueError(f"label must have an integer dtype, got {label.dtype}")
        spacing_values = [float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1)]
        if len(spacing_values) != label.ndim:
            raise ValueError(f"spacing {spacing_values} does not match a {label.ndim}-d label")

        flat = label.reshape(-1)
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self._num_classes):
            bad = sorted(set(np.unique(flat).tolist()) - set(range(self._num_classes)))
            raise ValueError(
                f"label values {bad} outside 0..{self._num_classes - 1} ({self.class_names})"
            )
        if not np.can_cast(flat.dtype, np.intp):  # bincount refuses e.g. uint64
            flat = flat.astype(np.intp)
        counts = np.bincount(flat, minlength=self._num_classes)
        self._voxel_counts += counts
        self._case_counts += counts > 0
        self._spacings.append(spacing_values)
        self._shapes.append([int(n) for n in label.shape])

        case_index = self.num_cases - 1
        foreground = image[label > 0]
        if foreground.size == 0:
            return
        values = foreground.astype(np.float64)
        n = values.size
        case_sum = float(values.sum())
        case_mean = case_sum / n
        case_m2 = float(np.square(values - case_mean).sum())
        if self._fg_count:
            delta = case_mean - self._fg_sum / self._fg_count
            total = self._fg_count + n
            self._fg_m2 += case_m2 + delta * delta * self._fg_count * n / total
        else:
            self._fg_m2 = case_m2
        self._fg_count += n
        self._fg_sum += case_sum
        self._fg_min = min(self._fg_min, float(values.min()))
        self._fg_max = max(self._fg_max, float(values.max()))

        if n <= self.samples_per_case:
            sample = foreground
        else:
            rng = np.random.default_rng([self.seed, case_index])
            sample = foreground[rng.choice(n, size=self.samples_per_case, replace=False)]
        self._samples.append(np.array(sample, copy=True))

    def result(self) -> dict[str, Any]:
        """The fingerprint of the cases added so far.

        Returns
        -------
        dict
            JSON-serialisable (plain ints, floats, lists, None) with ``num_cases``,
            ``class_names``, ``class_voxel_counts``, ``class_case_counts``, ``spacings``,
            ``shapes``, ``spacing_median``, ``shape_median`` and ``foreground_intensity``
            (``mean``, ``std``, ``min``, ``max`` exact over all foreground voxels;
            ``percentile_00_5``, ``percentile_99_5``, ``median`` from the sample;
            ``num_voxels``, ``num_samples``). Intensity statistics are None when no case
            has foreground; the medians are None when no case was added.
        """
        intensity: dict[str, Any] = dict.fromkeys(INTENSITY_KEYS)
        intensity["num_voxels"] = int(self._fg_count)
        intensity["num_samples"] = int(sum(s.size for s in self._samples))
        if self._fg_count:
            sample = np.concatenate(self._samples).astype(np.float64)
            p_low, p_high, median = np.percentile(sample, [0.5, 99.5, 50.0])
            intensity.update(
                mean=self._fg_sum / self._fg_count,
                std=float(np.sqrt(self._fg_m2 / self._fg_count)),
                min=self._fg_min,
                max=self._fg_max,
                percentile_00_5=float(p_low),
                percentile_99_5=float(p_high),
                median=float(median),
            )

        spacing_median = shape_median = None
        if self._shapes:
            spacing_median = [float(v) for v in np.median(np.array(self._spacings), axis=0)]
            shape_median = [float(v) for v in np.median(np.array(self._shapes), axis=0)]
        return {
            "num_cases": self.num_cases,
            "class_names": list(self.class_names),
            "class_voxel_counts": [int(c) for c in self._voxel_counts],
            "class_case_counts": [int(c) for c in self._case_counts],
            "spacings": [list(s) for s in self._spacings],
            "shapes": [list(s) for s in self._shapes],
            "spacing_median": spacing_median,
            "shape_median": shape_median,
            "foreground_intensity": intensity,
        }


def fingerprint_hash(fp: dict[str, Any]) -> str:
    """Short content hash of a fingerprint.

    Parameters
    ----------
    fp : dict
        A JSON-serialisable fingerprint, e.g. from :meth:`FingerprintAccumulator.result`.

    Returns
    -------
    str
        The first 16 hex characters of the sha256 of ``fp`` as canonical JSON (sorted
        keys, no whitespace), so equal fingerprints hash equally whatever their key order.
    """
    canonical = json.dumps(fp, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
