"""Keras metrics for training-time monitoring: overlap scores of the hard prediction.

Unlike the evaluation metrics (``medseg.evaluation``), which score whole cases, these
accumulate voxel counts over all the batches seen since the last ``reset_state`` (an epoch
of patches), in the spirit of nnU-Net's online pseudo-Dice. Each metric scores one
*structure*: a class, or a region made of several labels (KiTS's kidney-and-tumour region
is labels {1, 2}).

Conventions
-----------
* The prediction is hard: the argmax of ``y_pred`` (of ``y_true`` too, one-hot); with one
  sigmoid channel, a voxel is foreground when its probability exceeds 0.5.
* A score whose denominator is 0 is undefined and reported as NaN, as in
  ``medseg.evaluation``: Dice and IoU when the structure is absent from both targets and
  predictions, sensitivity when it is absent from the targets, specificity when it fills
  them. Tracking skips non-finite values when logging.
* Counts are float64 variables: a float32 count stops being exact past 2**24 voxels, i.e.
  after a handful of 3D patches. They are created with ``aggregation="sum"`` (Keras's
  default for metrics), so under ``tf.distribute`` the replicas' counts add up before the
  ratio is taken.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import keras
from keras import ops

__all__ = [
    "METRICS",
    "ClassDice",
    "DiceScore",
    "IoUScore",
    "Sensitivity",
    "Specificity",
    "class_dice_metrics",
    "metric_key",
    "metrics_from_config",
]


def metric_key(name: str) -> str:
    """``name`` as a stable, MLflow- and Keras-safe key: runs of other characters → ``_``.

    Examples
    --------
    >>> metric_key("left atrium")
    'left_atrium'
    >>> metric_key("kidney+tumour")
    'kidney_tumour'
    """
    key = re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_")
    if not key:
        raise ValueError(f"cannot make a metric name from {name!r}")
    return key


def _hard_labels(y, channels: int):
    """Label map (B, *spatial) of one-hot/probability maps, thresholded if one channel."""
    if channels == 1:
        return ops.cast(ops.greater(y[..., 0], 0.5), "int32")
    return ops.cast(ops.argmax(y, axis=-1), "int32")


class _StructureCounts(keras.metrics.Metric):
    """TP, FP, FN and TN voxel counts of one structure, accumulated across batches.

    Subclasses define ``KIND`` (the name prefix) and ``_ratio`` (numerator, denominator).
    """

    KIND = ""

    def __init__(
        self, labels: int | Sequence[int], name: str | None = None, dtype: str | None = None
    ):
        labels = [labels] if isinstance(labels, int) else list(labels)
        if not labels or not all(isinstance(v, int) and v >= 0 for v in labels):
            raise ValueError(
                f"{type(self).__name__}: labels must be one or more class indices >= 0, "
                f"got {labels}"
            )
        default = f"{self.KIND}_{'_'.join(str(v) for v in labels)}"
        super().__init__(name=name or default, dtype=dtype)
        self.labels = tuple(sorted(set(labels)))
        self.true_positives = self.add_variable((), "zeros", dtype="float64", name="tp")
        self.false_positives = self.add_variable((), "zeros", dtype="float64", name="fp")
        self.false_negatives = self.add_variable((), "zeros", dtype="float64", name="fn")
        self.true_negatives = self.add_variable((), "zeros", dtype="float64", name="tn")

    def _mask(self, label_map):
        mask = ops.zeros_like(label_map, dtype="bool")
        for label in self.labels:
            mask = ops.logical_or(mask, ops.equal(label_map, label))
        return ops.cast(mask, "float64")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Add the counts of one batch.

        Parameters
        ----------
        y_true : tensor, shape (B, *spatial, C)
            One-hot targets (C = 1: binary targets).
        y_pred : tensor, shape (B, *spatial, C)
            Probabilities or scores (C = 1: sigmoid probabilities).
        sample_weight : tensor, optional
            Weights broadcastable to ``(B, *spatial)`` (e.g. per sample, shape (B,)).
        """
        channels = y_pred.shape[-1]
        if y_true.shape[-1] != channels:
            raise ValueError(
                f"{self.name}: targets have {y_true.shape[-1]} channels but predictions {channels}"
            )
        if channels is not None and max(self.labels) >= max(channels, 2):
            raise ValueError(
                f"{self.name}: labels {list(self.labels)} outside the {max(channels, 2)} "
                "classes of the predictions"
            )
        predicted = self._mask(_hard_labels(y_pred, channels))
        target = self._mask(_hard_labels(y_true, channels))
        overlap = predicted * target
        ones = ops.ones_like(target)
        if sample_weight is not None:
            weight = ops.cast(sample_weight, "float64")
            while len(weight.shape) < len(target.shape):  # (B,) → (B, 1, ..., 1)
                weight = ops.expand_dims(weight, -1)
            predicted, target, overlap = predicted * weight, target * weight, overlap * weight
            ones = ones * weight
        self.true_positives.assign_add(ops.sum(overlap))
        self.false_positives.assign_add(ops.sum(predicted - overlap))
        self.false_negatives.assign_add(ops.sum(target - overlap))
        # TN = all − (TP + FP + FN) = all − |P ∪ T|
        self.true_negatives.assign_add(ops.sum(ones - predicted - target + overlap))

    def _ratio(self):
        raise NotImplementedError

    def result(self):
        numerator, denominator = self._ratio()
        score = ops.where(
            denominator > 0,
            numerator / ops.maximum(denominator, 1.0),
            ops.convert_to_tensor(float("nan"), "float64"),
        )
        return ops.cast(score, self.dtype)

    def reset_state(self):
        for variable in self.variables:
            variable.assign(ops.zeros((), dtype=variable.dtype))

    def get_config(self) -> dict:
        return {"labels": list(self.labels), "name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="medseg")
class DiceScore(_StructureCounts):
    """Dice ``2TP / (2TP + FP + FN)`` of a class or region, accumulated across batches.

    Parameters
    ----------
    labels : int or sequence of int
        The class, or the classes whose union is the region.
    name : str, optional
        Name of the metric; defaults to ``dice_<labels joined by _>``.
    dtype : str, optional
        dtype of the result.
    """

    KIND = "dice"

    def _ratio(self):
        numerator = 2.0 * self.true_positives
        return numerator, numerator + self.false_positives + self.false_negatives


@keras.saving.register_keras_serializable(package="medseg")
class IoUScore(_StructureCounts):
    """Intersection over union (Jaccard) ``TP / (TP + FP + FN)``; parameters as DiceScore."""

    KIND = "iou"

    def _ratio(self):
        tp = self.true_positives
        return tp, tp + self.false_positives + self.false_negatives


@keras.saving.register_keras_serializable(package="medseg")
class Sensitivity(_StructureCounts):
    """Sensitivity (recall) ``TP / (TP + FN)``; parameters as DiceScore."""

    KIND = "sensitivity"

    def _ratio(self):
        return self.true_positives, self.true_positives + self.false_negatives


@keras.saving.register_keras_serializable(package="medseg")
class Specificity(_StructureCounts):
    """Specificity ``TN / (TN + FP)``; parameters as DiceScore."""

    KIND = "specificity"

    def _ratio(self):
        return self.true_negatives, self.true_negatives + self.false_positives


@keras.saving.register_keras_serializable(package="medseg")
class ClassDice(DiceScore):
    """Dice of one class, accumulated across batches: :class:`DiceScore` of ``class_id``.

    Parameters
    ----------
    class_id : int
        Index of the class along the last axis.
    name : str, optional
        Name of the metric; defaults to ``dice_<class_id>``.
    dtype : str, optional
        dtype of the result.
    """

    def __init__(self, class_id: int, name: str | None = None, dtype: str | None = None):
        super().__init__(int(class_id), name=name, dtype=dtype)
        self.class_id = int(class_id)

    def get_config(self) -> dict:
        return {"class_id": self.class_id, "name": self.name, "dtype": self.dtype}


METRICS = {
    "dice": DiceScore,
    "iou": IoUScore,
    "sensitivity": Sensitivity,
    "specificity": Specificity,
}
"""Metric kind (the name prefix) → class."""


def class_dice_metrics(class_names: Sequence[str]) -> list[ClassDice]:
    """One :class:`ClassDice` per foreground class, named ``dice_<class name>``.

    Parameters
    ----------
    class_names : sequence of str
        Names of all the classes in label order, background (class 0) first.
    """
    names = list(class_names)[1:]
    return [
        ClassDice(class_id, name=f"dice_{metric_key(name)}")
        for class_id, name in enumerate(names, 1)
    ]


def metrics_from_config(
    class_names: Sequence[str],
    regions: Mapping[str, Sequence[int]] | None = None,
    kinds: Sequence[str] = tuple(METRICS),
) -> list[keras.metrics.Metric]:
    """The training-time metrics of every foreground class and declared region.

    Parameters
    ----------
    class_names : sequence of str
        Names of all the classes in label order, background (class 0) first.
    regions : mapping of str to sequence of int, optional
        Composite structures, e.g. ``{"kidney_and_tumour": [1, 2]}`` (a dataset's
        ``regions`` metadata).
    kinds : sequence of str
        Which scores, among ``dice``, ``iou``, ``sensitivity`` and ``specificity``.

    Returns
    -------
    list of keras.metrics.Metric
        For each kind, one metric per foreground class then per region, named
        ``<kind>_<structure>`` with the name made safe by :func:`metric_key`, e.g.
        ``dice_kidney``, ``iou_kidney_and_tumour``.

    Raises
    ------
    ValueError
        For an unknown kind, a region with no label or a label outside the classes, or
        two structures whose names give the same metric name.
    """
    class_names = list(class_names)
    if len(class_names) < 2:
        raise ValueError(f"need the background and at least one class, got {class_names}")
    unknown = [kind for kind in kinds if kind not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric kinds {unknown}: use {', '.join(METRICS)}")
    structures = [(name, [label]) for label, name in enumerate(class_names) if label > 0]
    for region, labels in (regions or {}).items():
        labels = [int(v) for v in labels]
        bad = [v for v in labels if not 0 <= v < len(class_names)]
        if not labels or bad:
            raise ValueError(
                f"region {region!r}: labels {labels} must be a non-empty subset of "
                f"0..{len(class_names) - 1} ({', '.join(class_names)})"
            )
        structures.append((region, labels))
    metrics, seen = [], {}
    for kind in kinds:
        for structure, labels in structures:
            name = f"{kind}_{metric_key(structure)}"
            if name in seen:
                raise ValueError(
                    f"structures {seen[name]!r} and {structure!r} both give the metric "
                    f"name {name!r}"
                )
            seen[name] = structure
            metrics.append(METRICS[kind](labels, name=name))
    return metrics
