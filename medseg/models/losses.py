"""Soft Dice + cross-entropy loss (nnU-Net's default), distribution-aware.

The Dice term is nnU-Net's *batch* Dice: for every class, the overlap and the volumes are
summed over the batch and all spatial axes before the ratio is taken, so the loss of a
batch is one number, not a mean of per-sample values.

Reduction and ``tf.distribute``
-------------------------------
Keras 3 reduces what ``Loss.call`` returns with ``reduce_values``: a per-sample vector is
summed, divided by its size *and* divided by the number of replicas (so that the
optimizer's cross-replica SUM of gradients gives the global mean). A scalar, however, is
returned untouched, without that division. Since batch Dice is a scalar by nature,
:class:`DiceCrossEntropyLoss` uses ``reduction="none"`` (Keras must not reduce anything)
and does the whole reduction itself:

* under a strategy with several replicas, the per-class Dice statistics are summed across
  replicas (``ReplicaContext.all_reduce``, which is differentiable), so the Dice term is
  the Dice of the *global* batch, as on one device (nnU-Net does the same all-gather in
  DDP);
* the cross-entropy is the mean over the replica's voxels;
* the total is divided by ``num_replicas_in_sync``, as Keras does for its own losses, so
  that summed gradients equal the one-device gradients and the logged loss (which Keras
  multiplies back by the number of replicas) is the global loss.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

SMOOTH = 1e-5  # nnU-Net's smoothing: keeps the ratio defined for classes absent everywhere
EPSILON = 1e-7  # probability clipping for the log of the cross-entropy


def _dice_statistics(y_true, y_pred):
    """Per-class ``(intersection, sum of predictions, sum of targets)``, shape (3, C)."""
    axes = tuple(range(len(y_pred.shape) - 1))  # batch and spatial axes
    return ops.stack(
        [
            ops.sum(y_true * y_pred, axis=axes),
            ops.sum(y_pred, axis=axes),
            ops.sum(y_true, axis=axes),
        ]
    )


def _dice_from_statistics(statistics, smooth, include_background):
    intersection, predicted, target = statistics[0], statistics[1], statistics[2]
    dice = (2.0 * intersection + smooth) / (predicted + target + smooth)
    # class 0 is the background by convention
    return dice if include_background else dice[1:]


def soft_dice(
    y_true,
    y_pred,
    include_background: bool = False,
    smooth: float = SMOOTH,
    per_class: bool = False,
):
    """Soft batch Dice of probabilities against one-hot targets.

    Parameters
    ----------
    y_true : tensor, shape (B, *spatial, C)
        One-hot targets.
    y_pred : tensor, shape (B, *spatial, C)
        Probabilities (softmax output).
    include_background : bool
        Whether class 0 counts; by default only the foreground classes do.
    smooth : float
        Added to the numerator and the denominator: ``(2·Σpg + s) / (Σp + Σg + s)``.
    per_class : bool
        Return the Dice of every (kept) class instead of their mean.

    Returns
    -------
    tensor
        Scalar mean Dice, or shape (C,) / (C - 1,) with ``per_class``. Sums run over the
        batch and the spatial axes together (nnU-Net's batch Dice); no cross-replica sum.
    """
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    dice = _dice_from_statistics(_dice_statistics(y_true, y_pred), smooth, include_background)
    return dice if per_class else ops.mean(dice)


def _replica_context_to_sync():
    """The replica context when running in one of several replicas, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None  # one device, or cross-replica context (e.g. Keras's symbolic build)
    return context


@keras.saving.register_keras_serializable(package="medseg")
class DiceCrossEntropyLoss(keras.losses.Loss):
    """``dice_weight · (1 − mean soft batch Dice) + ce_weight · cross-entropy``.

    Parameters
    ----------
    dice_weight, ce_weight : float
        Weights of the two terms.
    include_background : bool
        Whether the background (class 0) enters the Dice mean.
    smooth : float
        Dice smoothing, see :func:`soft_dice`.
    epsilon : float
        Probabilities are clipped to ``[epsilon, 1 - epsilon]`` in the cross-entropy.
    name : str
        Name of the loss.
    dtype : str, optional
        Computation dtype; defaults to Keras's floatx.

    Notes
    -----
    ``y_true`` is one-hot ``(B, *spatial, C)``, ``y_pred`` softmax probabilities of the same
    shape. The loss is a scalar already reduced over the batch, the voxels and the replicas,
    hence ``reduction="none"`` (see the module docstring). Per-sample weights have no meaning
    for a batch Dice and are refused.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = False,
        smooth: float = SMOOTH,
        epsilon: float = EPSILON,
        name: str = "dice_cross_entropy",
        dtype: str | None = None,
    ):
        super().__init__(name=name, reduction="none", dtype=dtype)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.include_background = bool(include_background)
        self.smooth = float(smooth)
        self.epsilon = float(epsilon)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                "DiceCrossEntropyLoss computes a batch Dice and takes no sample_weight"
            )
        return super().__call__(y_true, y_pred)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        statistics = _dice_statistics(y_true, y_pred)
        context = _replica_context_to_sync()
        if context is not None:
            statistics = context.all_reduce(tf.distribute.ReduceOp.SUM, statistics)
        dice = _dice_from_statistics(statistics, self.smooth, self.include_background)

        probabilities = ops.clip(y_pred, self.epsilon, 1.0 - self.epsilon)
        cross_entropy = ops.mean(-ops.sum(y_true * ops.log(probabilities), axis=-1))

        loss = self.dice_weight * (1.0 - ops.mean(dice)) + self.ce_weight * cross_entropy
        if context is not None:
            # what Keras's reduce_values does for per-sample losses, see the module docstring
            loss = loss / ops.cast(context.num_replicas_in_sync, loss.dtype)
        return loss

    def get_config(self) -> dict:
        return {
            "dice_weight": self.dice_weight,
            "ce_weight": self.ce_weight,
            "include_background": self.include_background,
            "smooth": self.smooth,
            "epsilon": self.epsilon,
            "name": self.name,
            "dtype": self._dtype_policy.name,
        }
