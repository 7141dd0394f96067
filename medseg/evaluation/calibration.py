"""Calibration of predicted class probabilities: expected calibration error (ECE),
reliability curves and diagrams, and temperature scaling.

Equal-width confidence bins on ``[0, 1]``: bin ``b`` of ``n`` holds confidences in
``[b/n, (b+1)/n)``, the last one also ``1``. Per structure the ECE is one-vs-rest on that
class's probability (is the voxel that class?); the top-label ECE takes the largest
probability of each voxel and whether the argmax is right (Guo et al., 2017). Both weight
each bin by its voxel count::

    ECE = sum_b |sum of correct_b - sum of confidence_b| / N

so the sums per bin are all a dataset needs: :class:`CalibrationAccumulator` adds them up
case by case and the whole-dataset ECE is exact without keeping any voxel.

The sliding window (:mod:`medseg.inference.sliding_window`) merges probabilities, not
logits, so temperature scaling here is fitted on log-probabilities: ``softmax(log p / T)``
equals ``p ** (1/T)`` renormalised, and the argmax never changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medseg.io.atomic import write_atomically

__all__ = [
    "TEMPERATURE_FILE",
    "CalibrationAccumulator",
    "apply_temperature",
    "expected_calibration_error",
    "fit_temperature",
    "plot_reliability_diagram",
    "read_temperature",
    "reliability_curve",
    "write_temperature",
]

#: File name of a fitted temperature, stored next to the model.
TEMPERATURE_FILE = "temperature.json"

# voxels binned at a time: the bin indices of a whole CT (~10^8 voxels, int64) would
# cost gigabytes; a chunk costs a few tens of megabytes
_CHUNK = 1 << 21
# probabilities a little outside [0, 1] are rounding (resampling, float32 sums)
_TOLERANCE = 1e-4


def _check_inputs(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> None:
    """Shapes, bins, probability range and label range, before anything is allocated."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r}: give a positive whole number of bins, e.g. 15")
    if probs.ndim < 1 or probs.shape[-1] < 2:
        raise ValueError(
            f"probs of shape {probs.shape}: give (..., K) probabilities with K >= 2 classes "
            "on the last axis"
        )
    if probs.shape[:-1] != labels.shape:
        raise ValueError(
            f"probs of shape {probs.shape} and labels of shape {labels.shape} do not match: "
            "labels must have the shape of probs without its last (class) axis"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels of dtype {labels.dtype}: give integer class labels")
    if probs.size == 0:
        raise ValueError("probs is empty: give at least one voxel")
    lo, hi = float(np.min(probs)), float(np.max(probs))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -_TOLERANCE or hi > 1 + _TOLERANCE:
        raise ValueError(
            f"probs range from {lo} to {hi}: give probabilities in [0, 1] (apply softmax "
            "to logits first)"
        )
    k = probs.shape[-1]
    lmin, lmax = int(np.min(labels)), int(np.max(labels))
    if lmin < 0 or lmax >= k:
        raise ValueError(
            f"labels range from {lmin} to {lmax} but probs has {k} classes: labels must be "
            f"in 0 .. {k - 1}"
        )


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence; 1 (and rounding above it) in the last bin."""
    return np.clip((confidence * n_bins).astype(np.int64), 0, n_bins - 1)


class CalibrationAccumulator:
    """Per-bin sums (voxel count, confidence, correct) over any number of cases.

    Rows ``0 .. K-1`` are the one-vs-rest statistics of each class, row ``K`` the top
    label. Adding cases one at a time gives exactly the ECE of all their voxels at once.

    Parameters
    ----------
    num_classes : int
        ``K``, background included.
    n_bins : int, optional
        Equal-width confidence bins.

    Examples
    --------
    >>> acc = CalibrationAccumulator(3)
    >>> for probs, labels in cases:  # doctest: +SKIP
    ...     acc.update(probs, labels)
    >>> per_class, top_label = acc.ece()  # doctest: +SKIP
    """

    def __init__(self, num_classes: int, n_bins: int = 15):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r}: give at least 2 classes")
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"n_bins={n_bins!r}: give a positive whole number of bins, e.g. 15")
        self.num_classes = int(num_classes)
        self.n_bins = int(n_bins)
        shape = (self.num_classes + 1, self.n_bins)
        self.counts = np.zeros(shape, dtype=np.float64)
        self.confidence = np.zeros(shape, dtype=np.float64)
        self.correct = np.zeros(shape, dtype=np.float64)

    def update(self, probs: np.ndarray, labels: np.ndarray) -> CalibrationAccumulator:
        """Add the voxels of one case.

        Parameters
        ----------
        probs : np.ndarray
            ``(..., K)`` class probabilities.
        labels : np.ndarray of int
            ``(...)`` true classes.

        Returns
        -------
        CalibrationAccumulator
            ``self``.

        Raises
        ------
        ValueError
            Shapes that do not match, probabilities outside ``[0, 1]``, labels outside
            ``0 .. K-1`` or a class count other than the accumulator's.
        """
        probs, labels = np.asarray(probs), np.asarray(labels)
        _check_inputs(probs, labels, self.n_bins)
        if probs.shape[-1] != self.num_classes:
            raise ValueError(
                f"probs has {probs.shape[-1]} classes but the accumulator {self.num_classes}: "
                "accumulate cases of one model's classes"
            )
        flat = probs.reshape(-1, self.num_classes)
        truth = labels.reshape(-1)
        k = self.num_classes
        for start in range(0, len(truth), _CHUNK):
            p = flat[start:start + _CHUNK].astype(np.float64)
            t = truth[start:start + _CHUNK]
            for c in range(k):
                self._add(c, p[:, c], t == c)
            top = np.argmax(p, axis=1)
            self._add(k, p[np.arange(len(t)), top], top == t)
        return self

    def _add(self, row: int, confidence: np.ndarray, correct: np.ndarray) -> None:
        index = _bin_index(confidence, self.n_bins)
        self.counts[row] += np.bincount(index, minlength=self.n_bins)
        self.confidence[row] += np.bincount(index, weights=confidence, minlength=self.n_bins)
        self.correct[row] += np.bincount(index, weights=correct, minlength=self.n_bins)

    def merge(self, other: CalibrationAccumulator) -> CalibrationAccumulator:
        """Add another accumulator's sums (e.g. of another fold); returns ``self``."""
        if (other.num_classes, other.n_bins) != (self.num_classes, self.n_bins):
            raise ValueError(
                f"cannot merge {other.num_classes} classes x {other.n_bins} bins into "
                f"{self.num_classes} x {self.n_bins}: use the same classes and n_bins"
            )
        self.counts += other.counts
        self.confidence += other.confidence
        self.correct += other.correct
        return self

    @property
    def total(self) -> int:
        """Voxels accumulated."""
        return int(self.counts[-1].sum())

    def ece(self) -> tuple[np.ndarray, float]:
        """The ECE of every voxel added so far.

        Returns
        -------
        per_class : np.ndarray
            ``(K,)`` one-vs-rest ECE of each class (background included); NaN before any
            update.
        top_label : float
            The top-label ECE.
        """
        total = self.counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.abs(self.correct - self.confidence).sum(axis=1) / total
        values = np.where(total > 0, values, np.nan)
        return values[:-1], float(values[-1])

    def curve(self, structure: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reliability curve: mean confidence, accuracy and voxel count per bin.

        Parameters
        ----------
        structure : int, optional
            A class (one-vs-rest); None: the top label.

        Returns
        -------
        confidence, accuracy : np.ndarray
            ``(n_bins,)`` means per bin; NaN in an empty bin.
        counts : np.ndarray of int64
            ``(n_bins,)`` voxels per bin.
        """
        row = self.num_classes if structure is None else int(structure)
        if not 0 <= row <= self.num_classes or (structure is not None and row == self.num_classes):
            raise ValueError(
                f"structure={structure!r}: give a class in 0 .. {self.num_classes - 1} or None "
                "for the top label"
            )
        counts = self.counts[row]
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(counts > 0, self.confidence[row] / counts, np.nan)
            accuracy = np.where(counts > 0, self.correct[row] / counts, np.nan)
        return confidence, accuracy, counts.astype(np.int64)

    def to_dict(self) -> dict:
        """JSON-ready sums (floats), read back by :meth:`from_dict`."""
        return {
            "num_classes": self.num_classes,
            "n_bins": self.n_bins,
            "counts": self.counts.tolist(),
            "confidence": self.confidence.tolist(),
            "correct": self.correct.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationAccumulator:
        acc = cls(int(data["num_classes"]), int(data["n_bins"]))
        for key in ("counts", "confidence", "correct"):
            values = np.asarray(data[key], dtype=np.float64)
            if values.shape != acc.counts.shape:
                raise ValueError(
                    f"calibration sums {key!r} of shape {values.shape}, expected "
                    f"{acc.counts.shape}: the record is damaged or of another model"
                )
            setattr(acc, key, values)
        return acc


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, float]:
    """Expected calibration error per class (one-vs-rest) and of the top label.

    Parameters
    ----------
    probs : np.ndarray
        ``(..., K)`` class probabilities (e.g. a case's ``(D, H, W, K)``).
    labels : np.ndarray of int
        ``(...)`` true classes ``0 .. K-1``.
    n_bins : int, optional
        Equal-width confidence bins on ``[0, 1]``.

    Returns
    -------
    per_class : np.ndarray
        ``(K,)`` ECE of each class's probability against "is this class".
    top_label : float
        ECE of the largest probability against "the argmax is right".

    Raises
    ------
    ValueError
        Shapes that do not match, probabilities outside ``[0, 1]``, labels outside
        ``0 .. K-1``, ``n_bins < 1``.
    """
    probs = np.asarray(probs)
    _check_inputs(probs, np.asarray(labels), n_bins)
    return CalibrationAccumulator(probs.shape[-1], n_bins).update(probs, labels).ece()


def reliability_curve(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, structure: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean confidence, accuracy and voxel count of each confidence bin.

    Parameters
    ----------
    probs, labels, n_bins
        As in :func:`expected_calibration_error`.
    structure : int, optional
        A class (one-vs-rest on its probability); None: the top label.

    Returns
    -------
    confidence, accuracy : np.ndarray
        ``(n_bins,)``; NaN in an empty bin.
    counts : np.ndarray of int64
        ``(n_bins,)``.
    """
    probs = np.asarray(probs)
    _check_inputs(probs, np.asarray(labels), n_bins)
    acc = CalibrationAccumulator(probs.shape[-1], n_bins).update(probs, labels)
    return acc.curve(structure)


def plot_reliability_diagram(
    accumulator: CalibrationAccumulator,
    path: str | os.PathLike,
    class_names: list[str] | None = None,
) -> Path:
    """Reliability diagram to a PNG: accuracy against confidence per bin, the diagonal
    being perfect calibration, one line per foreground class and the top label; below,
    the voxels per bin (log scale).

    Parameters
    ----------
    accumulator : CalibrationAccumulator
        The sums of the cases shown (e.g. every validation case).
    path : path-like
        Target ``.png``, written atomically; parent directories are created.
    class_names : list of str, optional
        ``K`` names, background first; default ``class_<k>``.

    Returns
    -------
    Path
        The written file.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot (as medseg.evaluation.visuals)

    k = accumulator.num_classes
    names = list(class_names) if class_names is not None else [f"class_{c}" for c in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class_names for {k} classes: give one name per class")
    per_class, top = accumulator.ece()
    centres = (np.arange(accumulator.n_bins) + 0.5) / accumulator.n_bins

    fig = Figure(figsize=(6, 7), layout="constrained")
    curve_ax, count_ax = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    curve_ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    rows = [(None, f"top label (ECE {top:.3f})")]
    rows += [(c, f"{names[c]} (ECE {per_class[c]:.3f})") for c in range(1, k)]
    for structure, label in rows:
        confidence, accuracy, counts = accumulator.curve(structure)
        seen = counts > 0
        style = "-" if structure is None else "--"
        curve_ax.plot(confidence[seen], accuracy[seen], style, marker="o", markersize=3,
                      label=label)
        count_ax.step(centres, np.maximum(counts, 0.5), where="mid")  # log axis: no zeros
    curve_ax.set_xlim(0, 1)
    curve_ax.set_ylim(0, 1.02)
    curve_ax.set_ylabel("accuracy (fraction correct)")
    curve_ax.set_title(f"reliability ({accumulator.total} voxels, {accumulator.n_bins} bins)")
    curve_ax.legend(fontsize="small")
    curve_ax.grid(alpha=0.3)
    count_ax.set_yscale("log")
    count_ax.set_xlabel("confidence")
    count_ax.set_ylabel("voxels")
    count_ax.grid(alpha=0.3)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# -- temperature scaling ----------------------------------------------------------------

_EPS = 1e-12  # log(0) of a probability: a large negative score, never -inf


def _scores(values: np.ndarray, probabilities: bool) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.log(np.clip(values, _EPS, None)) if probabilities else values


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def fit_temperature(
    logits_or_probs: np.ndarray,
    labels: np.ndarray,
    probabilities: bool = True,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """The scalar temperature ``T > 0`` minimising the mean negative log-likelihood.

    Parameters
    ----------
    logits_or_probs : np.ndarray
        ``(..., K)`` scores of validation voxels (a sample of them is enough: the fit has
        one parameter).
    labels : np.ndarray of int
        ``(...)`` true classes.
    probabilities : bool, optional
        The scores are probabilities (what medseg's sliding window merges): fitted on
        their logarithms. False: logits.
    bounds : (float, float), optional
        Range of ``T`` searched (bounded search on ``log T``).

    Returns
    -------
    float
        ``T``; ``> 1`` softens over-confident probabilities, ``< 1`` sharpens.

    Raises
    ------
    ValueError
        Shapes that do not match, labels outside ``0 .. K-1``, bounds not ``0 < low <
        high``, probabilities outside ``[0, 1]``.
    """
    from scipy.optimize import minimize_scalar  # scipy only where fitting is asked for

    values, labels = np.asarray(logits_or_probs), np.asarray(labels)
    low, high = (float(b) for b in bounds)
    if not 0 < low < high or not np.isfinite(high):
        raise ValueError(f"bounds={bounds!r}: give 0 < low < high, e.g. (0.05, 20)")
    if probabilities:
        _check_inputs(values, labels, 1)
    else:
        if values.ndim < 1 or values.shape[:-1] != labels.shape or values.shape[-1] < 2:
            raise ValueError(
                f"logits of shape {values.shape} and labels of shape {labels.shape} do not "
                "match: give (..., K) logits, K >= 2, and (...) labels"
            )
        if not np.isfinite(values).all():
            raise ValueError("logits hold NaN or infinity: give finite logits")
        k = values.shape[-1]
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"labels must be in 0 .. {k - 1} for {k} classes")
        if labels.size == 0:
            raise ValueError("logits is empty: give at least one voxel")
    z = _scores(values, probabilities).reshape(-1, values.shape[-1])
    truth = labels.reshape(-1).astype(np.int64)
    rows = np.arange(len(truth))

    def nll(log_t: float) -> float:
        return float(-_log_softmax(z / np.exp(log_t))[rows, truth].mean())

    found = minimize_scalar(nll, bounds=(np.log(low), np.log(high)), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))


def apply_temperature(
    logits_or_probs: np.ndarray, temperature: float, probabilities: bool = True
) -> np.ndarray:
    """Probabilities ``softmax(z / T)`` with ``z`` the logits or log-probabilities.

    Parameters
    ----------
    logits_or_probs : np.ndarray
        ``(..., K)``.
    temperature : float
        From :func:`fit_temperature`; ``1`` returns the probabilities unchanged.
    probabilities : bool, optional
        As in :func:`fit_temperature`.

    Returns
    -------
    np.ndarray of float32
        ``(..., K)`` probabilities summing to 1; the argmax is that of the input.
    """
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature={temperature!r}: give a finite T > 0 (fit_temperature)")
    z = _scores(logits_or_probs, probabilities)
    return np.exp(_log_softmax(z / t)).astype(np.float32)


def write_temperature(path: str | os.PathLike, temperature: float, **extra) -> Path:
    """Write ``{"temperature": T, ...extra}`` to ``path`` (``temperature.json`` next to
    the model), atomically."""
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature={temperature!r}: give a finite T > 0 (fit_temperature)")
    text = json.dumps({"temperature": t, **extra}, indent=2)
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def read_temperature(path: str | os.PathLike) -> float:
    """The temperature in a file written by :func:`write_temperature`.

    Raises
    ------
    ValueError
        Naming the file when it is not JSON or holds no finite ``temperature > 0``.
    """
    try:
        data = json.loads(Path(path).read_text())
        t = float(data["temperature"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: not a temperature file ({type(err).__name__}: {err}); expected "
            '{"temperature": <float>}: re-fit it with fit_temperature or delete it'
        ) from err
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"{path}: temperature {t} is not a finite T > 0; re-fit it or delete it")
    return t
