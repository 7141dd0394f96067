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

__all__ = [
    "Fingerprint",
    "FingerprintAccumulator",
    "fingerprint_hash",
    "format_fingerprint",
    "format_numbers",
]

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
        self._layouts: list[list[float]] = []
        # one intensity accumulator per image channel, created by the first case
        self._channels: list[_IntensityStats] | None = None

    @property
    def num_cases(self) -> int:
        """Number of cases added so far."""
        return len(self._shapes)

    def add(self, image: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> None:
        """Add one case.

        Parameters
        ----------
        image : np.ndarray
            Intensities (any real dtype), the shape of ``label`` or, for a multi-channel
            image, ``label.shape + (C,)``. Every case must have the same channel count.
        label : np.ndarray
            Integer labels in ``0 .. len(class_names) - 1``.
        spacing : sequence of float
            Voxel spacing in array-axis order, one value per axis of ``label``.
        """
        image = np.asarray(image)
        label = np.asarray(label)
        if image.shape == label.shape:
            channels = 1
        elif image.ndim == label.ndim + 1 and image.shape[:-1] == label.shape:
            channels = image.shape[-1]
        else:
            raise ValueError(f"image shape {image.shape} != label shape {label.shape}")
        if self._channels is not None and channels != len(self._channels):
            raise ValueError(
                f"image has {channels} channel(s), earlier cases had {len(self._channels)}"
            )
        if label.dtype.kind not in "ui":
            raise ValueError(f"label must have an integer dtype, got {label.dtype}")
        spacing_values = [float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1)]
        if len(spacing_values) != label.ndim:
            raise ValueError(f"spacing {spacing_values} does not match a {label.ndim}-d label")

        # order K avoids copying NIfTI's Fortran-ordered arrays
        flat = label.ravel(order="K")
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self._num_classes):
            bad = sorted(set(np.unique(flat).tolist()) - set(range(self._num_classes)))
            raise ValueError(
                f"label values {bad} outside 0..{self._num_classes - 1} ({self.class_names})"
            )
        mask = label > 0
        # foreground voxels in C order (as ``array[mask]``) at a fraction of its cost
        take = _ForegroundTaker(mask)
        n = take.count
        # class counts from the foreground labels only; background is the rest
        foreground_labels = take(label)
        if not np.can_cast(foreground_labels.dtype, np.intp):  # bincount refuses uint64
            foreground_labels = foreground_labels.astype(np.intp)
        counts = np.bincount(foreground_labels, minlength=self._num_classes)
        counts[0] = label.size - n
        if self._channels is None:
            self._channels = [_IntensityStats() for _ in range(channels)]
        self._voxel_counts += counts
        self._case_counts += counts > 0
        self._spacings.append(spacing_values)
        self._shapes.append([int(n) for n in label.shape])
        self._layouts.append(class_layout(label, self._num_classes))

        case_index = self.num_cases - 1
        if n == 0:
            return
        # one set of sampled voxels for every channel, drawn exactly as for one channel
        # (so single-channel fingerprints are unchanged by multi-channel support)
        chosen = None
        if n > self.samples_per_case:
            rng = np.random.default_rng([self.seed, case_index])
            chosen = rng.choice(n, size=self.samples_per_case, replace=False)
        for c, stats in enumerate(self._channels):
            stats.add(take(image if channels == 1 else image[..., c]), chosen)

    def result(self) -> dict[str, Any]:
        """The fingerprint of the cases added so far.

        Returns
        -------
        dict
            JSON-serialisable (plain ints, floats, lists, None) with ``num_cases``,
            ``class_names``, ``class_voxel_counts``, ``class_case_counts``, ``spacings``,
            ``shapes``, ``spacing_median``, ``shape_median``, the per-axis spacing range
            and spread ``spacing_min``, ``spacing_max``, ``spacing_percentile_10``,
            ``spacing_percentile_90``, the per-axis ``shape_min`` and ``shape_max``, and
            ``class_layouts`` (per case, :func:`class_layout`), ``foreground_intensity``
            (``mean``, ``std``, ``min``, ``max`` exact over all foreground voxels;
            ``percentile_00_5``, ``percentile_99_5``, ``median`` from the sample;
            ``num_voxels``, ``num_samples``). Intensity statistics are None when no case
            has foreground; the medians and ranges are None when no case was added. For
            images with ``C > 1`` channels ``foreground_intensity`` is channel 0's and
            ``foreground_intensity_per_channel`` lists all ``C``.
        """
        channels = self._channels or [_IntensityStats()]
        per_channel = [stats.result() for stats in channels]

        spacing_median = shape_median = None
        spacing_summary: dict[str, Any] = dict.fromkeys(
            ("spacing_min", "spacing_max", "spacing_percentile_10", "spacing_percentile_90")
        )
        shape_min = shape_max = None
        if self._shapes:
            spacings = np.array(self._spacings, dtype=np.float64)
            shapes = np.array(self._shapes, dtype=np.int64)
            spacing_median = [float(v) for v in np.median(spacings, axis=0)]
            shape_median = [float(v) for v in np.median(shapes, axis=0)]
            p10, p90 = np.percentile(spacings, [10.0, 90.0], axis=0)
            spacing_summary = {
                "spacing_min": [float(v) for v in spacings.min(axis=0)],
                "spacing_max": [float(v) for v in spacings.max(axis=0)],
                "spacing_percentile_10": [float(v) for v in p10],
                "spacing_percentile_90": [float(v) for v in p90],
            }
            shape_min = [int(v) for v in shapes.min(axis=0)]
            shape_max = [int(v) for v in shapes.max(axis=0)]
        result = {
            "num_cases": self.num_cases,
            "class_names": list(self.class_names),
            "class_voxel_counts": [int(c) for c in self._voxel_counts],
            "class_case_counts": [int(c) for c in self._case_counts],
            "spacings": [list(s) for s in self._spacings],
            "shapes": [list(s) for s in self._shapes],
            "spacing_median": spacing_median,
            "shape_median": shape_median,
            **spacing_summary,
            "shape_min": shape_min,
            "shape_max": shape_max,
            "class_layouts": [list(v) for v in self._layouts],
            # channel 0 for multi-channel data, so single-channel readers keep working
            "foreground_intensity": per_channel[0],
        }
        if len(per_channel) > 1:
            result["foreground_intensity_per_channel"] = per_channel
        return result


# voxels of the label grid class_layout looks at (a strided subsample of larger labels)
LAYOUT_VOXELS = 2**18


def class_layout(label: np.ndarray, num_classes: int) -> list[float]:
    """How far the foreground classes lie apart along each axis of one label map.

    Per axis: the voxel-weighted mean distance of each foreground class's centre from
    the whole foreground's centre, in units of the foreground's standard deviation along
    that axis. Bilateral or single-structure labels give ~0 along every axis (kidneys,
    tumours: 0.02-0.13 on the phantom); classes laid out along an axis give ~1 (brain
    lobes: 0.76 anterior-posterior, 0.64 inferior-superior, 0.02 left-right). A case
    with fewer than two foreground classes gives 0. Labels above :data:`LAYOUT_VOXELS`
    voxels are subsampled with one stride on every axis.
    """
    label = np.asarray(label)
    step = max(1, int(np.ceil((label.size / LAYOUT_VOXELS) ** (1 / max(label.ndim, 1)))))
    # C order, so that ``flat`` and the coordinates below walk the voxels alike
    grid = np.ascontiguousarray(label[(slice(None, None, step),) * label.ndim])
    flat = grid.ravel().astype(np.intp)
    counts = np.bincount(flat, minlength=num_classes)[1:].astype(np.float64)
    present = counts > 0
    if present.sum() < 2:
        return [0.0] * label.ndim
    total = counts.sum()
    layout = []
    for axis in range(grid.ndim):
        shape = [1] * grid.ndim
        shape[axis] = grid.shape[axis]
        coord = np.broadcast_to(
            np.arange(grid.shape[axis], dtype=np.float64).reshape(shape), grid.shape
        ).ravel()
        sums = np.bincount(flat, weights=coord, minlength=num_classes)[1:]
        squares = np.bincount(flat, weights=coord * coord, minlength=num_classes)[1:]
        centre = sums.sum() / total
        spread = np.sqrt(max(squares.sum() / total - centre * centre, 0.0))
        if spread == 0:
            layout.append(0.0)
            continue
        means = np.divide(sums, counts, out=np.full_like(sums, centre), where=present)
        layout.append(float((counts * np.abs(means - centre)).sum() / (total * spread)))
    return layout


class _ForegroundTaker:
    """``array[mask]`` for arrays shaped like ``mask``, fast for Fortran-ordered arrays.

    Boolean indexing walks a Fortran-ordered array (as NIfTI readers return) against its
    memory order, which costs ~40x a contiguous walk. Here the foreground is gathered in
    memory order and put back into C order by sorting its positions, once per mask; the
    values and their order are exactly those of ``array[mask]``.
    """

    def __init__(self, mask: np.ndarray):
        self.mask = mask
        self.positions = self.order = None
        if mask.ndim > 1 and mask.flags.f_contiguous and not mask.flags.c_contiguous:
            transposed = mask.T  # C-contiguous
            self.positions = np.flatnonzero(transposed)
            coords = np.unravel_index(self.positions, transposed.shape)
            c_index = np.ravel_multi_index(coords[::-1], mask.shape)
            self.order = np.argsort(c_index)
            self.count = int(self.positions.size)
        else:
            self.count = int(np.count_nonzero(mask))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if self.positions is not None and array.flags.f_contiguous:
            return array.T.ravel()[self.positions][self.order]
        return array[self.mask]


class _IntensityStats:
    """Foreground intensity statistics of one channel, merged case by case.

    Keeps the count, the float64 sum and sum of squared deviations (merged per case with
    Chan's formula, which stays exact where sum(x**2) would cancel), the extrema and the
    per-case samples.
    """

    def __init__(self):
        self.count = 0
        self.total = 0.0
        self.m2 = 0.0
        self.low = np.inf
        self.high = -np.inf
        self.samples: list[np.ndarray] = []

    def add(self, foreground: np.ndarray, chosen: np.ndarray | None) -> None:
        values = foreground.astype(np.float64)
        n = values.size
        case_sum = float(values.sum())
        case_mean = case_sum / n
        case_m2 = float(np.square(values - case_mean).sum())
        if self.count:
            delta = case_mean - self.total / self.count
            self.m2 += case_m2 + delta * delta * self.count * n / (self.count + n)
        else:
            self.m2 = case_m2
        self.count += n
        self.total += case_sum
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))
        sample = foreground if chosen is None else foreground[chosen]
        self.samples.append(np.array(sample, copy=True))

    def result(self) -> dict[str, Any]:
        intensity: dict[str, Any] = dict.fromkeys(INTENSITY_KEYS)
        intensity["num_voxels"] = int(self.count)
        intensity["num_samples"] = int(sum(s.size for s in self.samples))
        if self.count:
            sample = np.concatenate(self.samples).astype(np.float64)
            p_low, p_high, median = np.percentile(sample, [0.5, 99.5, 50.0])
            intensity.update(
                mean=self.total / self.count,
                std=float(np.sqrt(self.m2 / self.count)),
                min=self.low,
                max=self.high,
                percentile_00_5=float(p_low),
                percentile_99_5=float(p_high),
                median=float(median),
            )
        return intensity


class Fingerprint(dict):
    """A dataset fingerprint: its JSON object (a dict, as stored and logged) with typed
    accessors, so readers ask ``fp.spacings`` rather than index string keys.

    A missing entry raises a ValueError naming the fingerprint (``where``) and the key.
    """

    where: str = "fingerprint"

    @classmethod
    def of(cls, values: dict[str, Any] | Fingerprint, where: str = "fingerprint") -> Fingerprint:
        """``values`` as a Fingerprint (itself, when it is one)."""
        if isinstance(values, Fingerprint):
            return values
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
        fp = cls(values)
        fp.where = where
        return fp

    def _get(self, key: str):
        value = self.get(key)
        if value is None:
            raise ValueError(
                f"{self.where} has no {key!r} (a fingerprint of an older build: rebuild the "
                "dataset)"
            )
        return value

    @property
    def hash(self) -> str:
        """:func:`fingerprint_hash` of it."""
        return fingerprint_hash(self)

    @property
    def num_cases(self) -> int:
        return int(self._get("num_cases"))

    @property
    def class_names(self) -> list[str]:
        return [str(n) for n in self._get("class_names")]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def spacings(self) -> np.ndarray:
        """``(cases, axes)`` float64 spacing of every case, in mm."""
        return np.asarray(self._get("spacings"), np.float64)

    @property
    def shapes(self) -> np.ndarray:
        """``(cases, axes)`` spatial shape of every case (channels dropped)."""
        spacings = self.spacings
        return np.asarray(self._get("shapes"), np.float64)[:, : spacings.shape[1]]

    @property
    def spacing_median(self) -> tuple[float, ...] | None:
        value = self.get("spacing_median")
        return None if value is None else tuple(float(v) for v in value)

    @property
    def shape_median(self) -> tuple[float, ...] | None:
        value = self.get("shape_median")
        return None if value is None else tuple(float(v) for v in value)

    @property
    def class_voxel_counts(self) -> np.ndarray:
        return np.asarray(self._get("class_voxel_counts"), np.float64)

    @property
    def class_case_counts(self) -> np.ndarray:
        return np.asarray(self._get("class_case_counts"), np.float64)

    @property
    def class_layouts(self) -> np.ndarray | None:
        """``(cases, axes)`` :func:`class_layout` of every case; None in fingerprints
        built before it was recorded."""
        value = self.get("class_layouts")
        return None if value is None or not len(value) else np.asarray(value, np.float64)

    @property
    def intensity_channels(self) -> list[dict[str, Any]]:
        """The foreground intensity statistics of each channel (one for single-channel)."""
        per_channel = self.get("foreground_intensity_per_channel")
        return list(per_channel) if per_channel else [self.get("foreground_intensity") or {}]


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


def format_numbers(values, fmt: str = "{:.3g}") -> str:
    """``3 x 0.8 x 0.8``; ``n/a`` for None."""
    if values is None:
        return "n/a"
    return " x ".join(fmt.format(v) for v in values)



def format_fingerprint(fp: dict) -> str:
    """A dataset fingerprint as the lines ``medseg info`` prints.

    Parameters
    ----------
    fp : dict
        From :func:`medseg.datasets.read_fingerprint`; keys missing from fingerprints of
        older builds are shown as ``n/a``.

    Returns
    -------
    str
    """
    lines = [f"cases: {fp['num_cases']}"]
    total = sum(fp["class_voxel_counts"]) or 1
    lines.append("classes:                       voxels  (share)   cases")
    for index, name in enumerate(fp["class_names"]):
        voxels = fp["class_voxel_counts"][index]
        lines.append(
            f"  {index:3d} {name:22s} {voxels:12d}  ({100 * voxels / total:5.1f} %)"
            f"  {fp['class_case_counts'][index]:5d}"
        )
    lines.append(
        f"spacing (mm): median {format_numbers(fp['spacing_median'])}"
        f"   range {format_numbers(fp.get('spacing_min'))} .. {format_numbers(fp.get('spacing_max'))}"
    )
    if fp.get("spacing_percentile_10") is not None:
        lines.append(
            f"              10-90 %  {format_numbers(fp['spacing_percentile_10'])}"
            f" .. {format_numbers(fp['spacing_percentile_90'])}"
        )
    lines.append(
        f"shape: median {format_numbers(fp['shape_median'], '{:g}')}"
        f"   range {format_numbers(fp.get('shape_min'), '{:d}')}"
        f" .. {format_numbers(fp.get('shape_max'), '{:d}')}"
    )
    channels = fp.get("foreground_intensity_per_channel") or [fp["foreground_intensity"]]
    for channel, stats in enumerate(channels):
        title = "foreground_intensity" + (f" (channel {channel})" if len(channels) > 1 else "")
        if stats.get("mean") is None:
            lines.append(f"{title}: no foreground voxels")
            continue
        lines.append(
            f"{title}: mean {stats['mean']:.4g}  std {stats['std']:.4g}"
            f"  min {stats['min']:.4g}  max {stats['max']:.4g}"
        )
        lines.append(
            f"  percentiles 0.5 / 50 / 99.5: {stats['percentile_00_5']:.4g}"
            f" / {stats['median']:.4g} / {stats['percentile_99_5']:.4g}"
            f"  ({stats['num_voxels']} voxels, {stats['num_samples']} sampled)"
        )
    return "\n".join(lines)


