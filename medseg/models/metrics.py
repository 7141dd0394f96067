"""Keras metrics for training-time monitoring: Dice of the hard prediction, per class.

Unlike the evaluation metrics (``medseg.evaluation``), which score whole cases, these
accumulate voxel counts over all the batches seen since the last ``reset_state`` (an epoch
of patches), in the spirit of nnU-Net's online pseudo-Dice.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="medseg")
class ClassDice(keras.metrics.Metric):
    """Dice ``2TP / (2TP + FP + FN)`` of one class, accumulated across batches.

    The prediction is hard: a voxel belongs to ``class_id`` when it is the argmax of
    ``y_pred``; likewise for the one-hot ``y_true``.

    Parameters
    ----------
    class_id : int
        Index of the class along the last axis.
    name : str, optional
        Name of the metric; defaults to ``dice_<class_id>``.
    dtype : str, optional
        dtype of the result.

    Notes
    -----
    The counts are kept in float64 variables: a float32 count stops being exact past 2**24
    voxels, i.e. after a handful of 3D patches. The variables are created with
    ``aggregation="sum"`` (Keras's default for metrics), so under ``MirroredStrategy`` the
    replicas' counts add up before the ratio is taken.

    When the class appears neither in the targets nor in the predictions (denominator 0),
    the Dice is undefined and ``result()`` returns 0.0 rather than NaN, so that logs, early
    stopping and checkpoint selection stay NaN-free. Case-level evaluation reports NaN.
    """

    def __init__(self, class_id: int, name: str | None = None, dtype: str | None = None):
        super().__init__(name=name or f"dice_{class_id}", dtype=dtype)
        self.class_id = int(class_id)
        self.true_positives = self.add_variable((), "zeros", dtype="float64", name="tp")
        self.false_positives = self.add_variable((), "zeros", dtype="float64", name="fp")
        self.false_negatives = self.add_variable((), "zeros", dtype="float64", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Add the counts of one batch.

        Parameters
        ----------
        y_true : tensor, shape (B, *spatial, C)
            One-hot targets.
        y_pred : tensor, shape (B, *spatial, C)
            Probabilities or scores.
        sample_weight : tensor, optional
            Weights broadcastable to ``(B, *spatial)`` (e.g. per sample, shape (B,)).
        """
        predicted = ops.cast(ops.equal(ops.argmax(y_pred, axis=-1), self.class_id), "float64")
        target = ops.cast(ops.equal(ops.argmax(y_true, axis=-1), self.class_id), "float64")
        overlap = predicted * target
        if sample_weight is not None:
            weight = ops.cast(sample_weight, "float64")
            while len(weight.shape) < len(target.shape):  # (B,) → (B, 1, ..., 1)
                weight = ops.expand_dims(weight, -1)
            predicted, target, overlap = predicted * weight, target * weight, overlap * weight
        self.true_positives.assign_add(ops.sum(overlap))
        self.false_positives.assign_add(ops.sum(predicted - overlap))
        self.false_negatives.assign_add(ops.sum(target - overlap))

    def result(self):
        numerator = 2.0 * self.true_positives
        denominator = numerator + self.false_positives + self.false_negatives
        return ops.cast(ops.divide_no_nan(numerator, denominator), self.dtype)

    def reset_state(self):
        for variable in self.variables:
            variable.assign(ops.zeros((), dtype=variable.dtype))

    def get_config(self) -> dict:
        return {"class_id": self.class_id, "name": self.name, "dtype": self.dtype}


def class_dice_metrics(class_names: Sequence[str]) -> list[ClassDice]:
    """One :class:`ClassDice` per foreground class, named ``dice_<class name>``.

    Parameters
    ----------
    class_names : sequence of str
        Names of all the classes in label order, background (class 0) first.
    """
    names = list(class_names)[1:]
    return [ClassDice(class_id, name=f"dice_{name}") for class_id, name in enumerate(names, 1)]
