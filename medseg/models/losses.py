"""Segmentation losses: Dice, class-wise Dice, Dice + cross-entropy, Jaccard, Tversky,
focal Tversky, focal and combo; binary or multi-class, 2D or 3D, distribution-aware.

Inputs
------
``y_true`` is one-hot ``(B, *spatial, C)`` and ``y_pred`` softmax probabilities of the same
shape, or, for a binary problem with a sigmoid output, both have one channel ``(B, *spatial,
1)``. A single channel is read as the foreground of two classes ``[1 - p, p]``, so that every
loss sees class 0 as the background either way: ``include_background=False`` (the default)
leaves it out of the overlap (Dice-like) terms, and ``class_weights`` has one weight per
class, background first (two for a sigmoid output).

Overlap terms are computed from the soft counts of every class, ``TP = Σ p·g``, ``FP = Σ
p·(1 - g)`` and ``FN = Σ (1 - p)·g``, summed over the batch and the spatial axes together
(nnU-Net's *batch* Dice, ``batch_dice=True``) or per sample (``batch_dice=False``, the loss
is then the mean over samples). Their per-class ratios are averaged over the kept classes,
weighted by ``class_weights`` when given. Ratios carry a smoothing term ``s`` in numerator
and denominator (``(2·TP + s) / (2·TP + FP + FN + s)`` for Dice): a class absent from both
the targets and the predictions scores 1 (no loss), a class absent from the targets but
predicted scores about 0. Voxel terms (cross-entropy, focal) are means over all voxels,
each voxel weighted by the weight of its true class.

Reduction and ``tf.distribute``
-------------------------------
Keras 3 reduces what ``Loss.call`` returns with ``reduce_values``: a per-sample vector is
summed, divided by its size *and* divided by the number of replicas (so that the
optimizer's cross-replica SUM of gradients gives the global mean). A scalar, however, is
returned untouched, without that division. Since batch Dice is a scalar by nature, every
loss here uses ``reduction="none"`` (Keras must not reduce anything) and does the whole
reduction itself, so that each replica returns its *share* of the global loss:

* under a strategy with several replicas, the per-class overlap counts are summed across
  replicas (``ReplicaContext.all_reduce``, which is differentiable), so a batch Dice is the
  Dice of the *global* batch, as on one device (nnU-Net does the same all-gather in DDP);
  every replica computes the same value and returns it divided by ``num_replicas_in_sync``;
* means over voxels or samples are the replica's sum divided by the *global* count (also
  all-reduced), exact even when the replicas hold different numbers of samples.

The shares add up to the one-device loss, so the summed gradients equal the one-device
gradients, and the logged loss (which Keras multiplies back by the number of replicas and
averages) is the global loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

from medseg.config import ConfigError, LossConfig

SMOOTH = 1e-5  # nnU-Net's smoothing: keeps the ratio defined for classes absent everywhere
EPSILON = 1e-7  # probability clipping for the logs of the cross-entropies
FLOOR = 1e-7  # focal Tversky: 1 - TI is floored here, where (1 - TI) ** (1/γ) has a finite slope

__all__ = [
    "ClassWiseDiceLoss",
    "ComboLoss",
    "DiceCrossEntropyLoss",
    "FocalLoss",
    "FocalTverskyLoss",
    "JaccardLoss",
    "LOSSES",
    "SoftDiceLoss",
    "TverskyLoss",
    "as_class_channels",
    "loss_from_config",
    "soft_dice",
]


def as_class_channels(y_true, y_pred):
    """Targets and probabilities with one channel per class, background first.

    Parameters
    ----------
    y_true : tensor, shape (B, *spatial, C)
        One-hot targets (``C = 1``: binary targets in {0, 1}).
    y_pred : tensor, shape (B, *spatial, C)
        Softmax probabilities (``C = 1``: sigmoid probability of the foreground).

    Returns
    -------
    y_true, y_pred : tensors, shape (B, *spatial, max(C, 2))
        With ``C = 1``, ``[1 - x, x]`` along the last axis; ``y_true`` in ``y_pred``'s dtype.
    """
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(ops.convert_to_tensor(y_true), y_pred.dtype)
    if y_true.shape[-1] != y_pred.shape[-1]:
        raise ValueError(
            f"targets have {y_true.shape[-1]} channels but predictions {y_pred.shape[-1]}: "
            "expected one-hot targets matching the model's output"
        )
    if y_pred.shape[-1] == 1:
        y_true = ops.concatenate([1.0 - y_true, y_true], axis=-1)
        y_pred = ops.concatenate([1.0 - y_pred, y_pred], axis=-1)
    return y_true, y_pred


def _overlap_statistics(y_true, y_pred, per_sample: bool = False):
    """Per-class soft ``(TP, Σ p, Σ g)``, shape (3, C), or (3, B, C) with ``per_sample``."""
    axes = tuple(range(1 if per_sample else 0, len(y_pred.shape) - 1))
    return ops.stack(
        [
            ops.sum(y_true * y_pred, axis=axes),
            ops.sum(y_pred, axis=axes),
            ops.sum(y_true, axis=axes),
        ]
    )


# Per-class scores from the counts, each in [0, 1], 1 for a perfect prediction.
def _dice_score(tp, predicted, target, smooth):
    return (2.0 * tp + smooth) / (predicted + target + smooth)


def _jaccard_score(tp, predicted, target, smooth):
    return (tp + smooth) / (predicted + target - tp + smooth)


def _tversky_score(tp, predicted, target, smooth, alpha, beta):
    # Salehi et al. 2017: TP / (TP + α·FP + β·FN)
    return (tp + smooth) / (tp + alpha * (predicted - tp) + beta * (target - tp) + smooth)


def _dice_from_statistics(statistics, smooth, include_background):
    dice = _dice_score(statistics[0], statistics[1], statistics[2], smooth)
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
    y_true, y_pred = as_class_channels(y_true, y_pred)
    dice = _dice_from_statistics(_overlap_statistics(y_true, y_pred), smooth, include_background)
    return dice if per_class else ops.mean(dice)


def _replica_context_to_sync():
    """The replica context when running in one of several replicas, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None  # one device, or cross-replica context (e.g. Keras's symbolic build)
    return context


class _Reduction:
    """How one replica computes its share of a global loss (see the module docstring)."""

    def __init__(self):
        self.context = _replica_context_to_sync()

    def global_sum(self, value):
        if self.context is None:
            return value
        return self.context.all_reduce(tf.distribute.ReduceOp.SUM, value)

    def share_of_global(self, value):
        """This replica's share of a value every replica computes identically."""
        if self.context is None:
            return value
        return value / ops.cast(self.context.num_replicas_in_sync, value.dtype)

    def share_of_mean(self, values):
        """This replica's share of the mean of ``values`` over every replica's elements."""
        total = ops.sum(values)
        return total / self.global_sum(ops.cast(ops.size(values), total.dtype))


def _check_fraction(owner: str, name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: {name} must lie in [0, 1], got {value}")
    return value


def _check_positive(owner: str, name: str, value: float) -> float:
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{owner}: {name} must be a positive number, got {value}")
    return value


class _SegmentationLoss(keras.losses.Loss):
    """Shared machinery: class channels, class weights, refusal of sample weights.

    Subclasses implement ``_compute(y_true, y_pred, weights, reduction)`` returning this
    replica's share of the loss; ``weights`` is a (C,) tensor or None.
    """

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        name: str | None = None,
        dtype: str | None = None,
    ):
        super().__init__(name=name, reduction="none", dtype=dtype)
        if class_weights is not None:
            class_weights = tuple(float(w) for w in class_weights)
            if not all(w >= 0.0 and math.isfinite(w) for w in class_weights):
                raise ValueError(
                    f"{type(self).__name__}: class_weights must be finite and >= 0, "
                    f"got {list(class_weights)}"
                )
        self.class_weights = class_weights

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} reduces over the whole (global) batch itself and "
                "takes no sample_weight; use class_weights"
            )
        return super().__call__(y_true, y_pred)

    def call(self, y_true, y_pred):
        y_true, y_pred = as_class_channels(y_true, y_pred)
        weights = None
        if self.class_weights is not None:
            num_classes = y_pred.shape[-1]
            if len(self.class_weights) != num_classes:
                raise ValueError(
                    f"{type(self).__name__}: {len(self.class_weights)} class_weights for "
                    f"{num_classes} classes (one per class, background first)"
                )
            weights = ops.convert_to_tensor(self.class_weights, dtype=y_pred.dtype)
        return self._compute(y_true, y_pred, weights, _Reduction())

    def _compute(self, y_true, y_pred, weights, reduction):
        raise NotImplementedError

    def _voxel_weights(self, y_true, weights):
        """Weight of every voxel's true class, shape (B, *spatial); None without weights."""
        return None if weights is None else ops.sum(y_true * weights, axis=-1)

    def get_config(self) -> dict:
        return {
            "class_weights": None if self.class_weights is None else list(self.class_weights),
            "name": self.name,
            "dtype": self._dtype_policy.name,
        }


class _OverlapLoss(_SegmentationLoss):
    """A loss with overlap (Dice-like) terms: background, smoothing, batch or per sample."""

    def __init__(
        self,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = SMOOTH,
        batch_dice: bool = True,
        name: str | None = None,
        dtype: str | None = None,
    ):
        super().__init__(class_weights=class_weights, name=name, dtype=dtype)
        self.include_background = bool(include_background)
        self.smooth = float(smooth)
        if self.smooth < 0:
            raise ValueError(f"{type(self).__name__}: smooth must be >= 0, got {smooth}")
        self.batch_dice = bool(batch_dice)

    def _class_mean(self, losses, weights):
        """Mean of per-class losses (last axis) over the kept classes, weighted if asked."""
        start = 0 if self.include_background else 1
        kept = losses[..., start:]
        if weights is None:
            return ops.mean(kept, axis=-1)
        if sum(self.class_weights[start:]) == 0:
            raise ValueError(
                f"{type(self).__name__}: the class_weights of the classes it scores are all 0"
            )
        kept_weights = weights[start:]
        return ops.sum(kept * kept_weights, axis=-1) / ops.sum(kept_weights)

    def _overlap_term(self, y_true, y_pred, weights, reduction, class_loss):
        """This replica's share of the mean over kept classes of ``class_loss(TP, Σp, Σg)``."""
        if self.batch_dice:
            statistics = reduction.global_sum(_overlap_statistics(y_true, y_pred))
            loss = self._class_mean(class_loss(*ops.unstack(statistics)), weights)
            return reduction.share_of_global(loss)
        statistics = _overlap_statistics(y_true, y_pred, per_sample=True)  # (3, B, C)
        per_sample = self._class_mean(class_loss(*ops.unstack(statistics)), weights)
        return reduction.share_of_mean(per_sample)

    def _dice_term(self, y_true, y_pred, weights, reduction):
        def dice_loss(tp, predicted, target):
            return 1.0 - _dice_score(tp, predicted, target, self.smooth)

        return self._overlap_term(y_true, y_pred, weights, reduction, dice_loss)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "include_background": self.include_background,
            "smooth": self.smooth,
            "batch_dice": self.batch_dice,
        }


@keras.saving.register_keras_serializable(package="medseg")
class SoftDiceLoss(_OverlapLoss):
    """``1 − mean soft Dice`` (Milletari et al. 2016; nnU-Net's batch Dice by default).

    Parameters
    ----------
    include_background : bool
        Whether class 0 enters the mean.
    class_weights : sequence of float, optional
        One weight per class, background first: the mean over classes is weighted.
    smooth : float
        Added to numerator and denominator of every class's Dice.
    batch_dice : bool
        Pool the counts over the batch (True) or take the mean of per-sample losses.
    name : str
    dtype : str, optional
        Computation dtype; defaults to Keras's floatx.
    """

    def __init__(
        self,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = SMOOTH,
        batch_dice: bool = True,
        name: str = "soft_dice",
        dtype: str | None = None,
    ):
        super().__init__(include_background, class_weights, smooth, batch_dice, name, dtype)

    def _compute(self, y_true, y_pred, weights, reduction):
        return self._dice_term(y_true, y_pred, weights, reduction)


@keras.saving.register_keras_serializable(package="medseg")
class ClassWiseDiceLoss(SoftDiceLoss):
    """``1 − Dice`` of every sample and class, averaged over classes then samples.

    Unlike the batch Dice, counts are not pooled over the batch: a class small in one
    sample weighs as much as in another. Parameters as :class:`SoftDiceLoss`, without
    ``batch_dice``. A class absent from a sample's targets scores about 0 there unless the
    prediction is empty too, which makes this loss noisy on patches; raise ``smooth``
    (e.g. 1) to soften it.
    """

    def __init__(
        self,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = SMOOTH,
        name: str = "classwise_dice",
        dtype: str | None = None,
    ):
        super().__init__(include_background, class_weights, smooth, False, name, dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        del config["batch_dice"]
        return config


@keras.saving.register_keras_serializable(package="medseg")
class JaccardLoss(_OverlapLoss):
    """``1 − mean soft Jaccard index`` ``(TP + s) / (TP + FP + FN + s)``.

    Parameters as :class:`SoftDiceLoss`.
    """

    def __init__(
        self,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = SMOOTH,
        batch_dice: bool = True,
        name: str = "jaccard",
        dtype: str | None = None,
    ):
        super().__init__(include_background, class_weights, smooth, batch_dice, name, dtype)

    def _compute(self, y_true, y_pred, weights, reduction):
        def jaccard_loss(tp, predicted, target):
            return 1.0 - _jaccard_score(tp, predicted, target, self.smooth)

        return self._overlap_term(y_true, y_pred, weights, reduction, jaccard_loss)


@keras.saving.register_keras_serializable(package="medseg")
class TverskyLoss(_OverlapLoss):
    """``1 − mean Tversky index`` ``(TP + s) / (TP + α·FP + β·FN + s)`` (Salehi et al. 2017).

    Parameters
    ----------
    alpha, beta : float
        Weights of the false positives and of the false negatives; ``α = β = 0.5`` is the
        Dice, ``α = β = 1`` the Jaccard index. The paper's choice ``α = 0.3, β = 0.7``
        favours recall, for small structures.
    include_background, class_weights, smooth, batch_dice, name, dtype
        As :class:`SoftDiceLoss`.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = SMOOTH,
        batch_dice: bool = True,
        name: str = "tversky",
        dtype: str | None = None,
    ):
        super().__init__(include_background, class_weights, smooth, batch_dice, name, dtype)
        self.alpha = float(alpha)
        self.beta = float(beta)
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise ValueError(
                f"{type(self).__name__}: alpha and beta must be >= 0 and not both 0, "
                f"got alpha={alpha}, beta={beta}"
            )

    def _tversky(self, tp, predicted, target):
        return _tversky_score(tp, predicted, target, self.smooth, self.alpha, self.beta)

    def _compute(self, y_true, y_pred, weights, reduction):
        def tversky_loss(tp, predicted, target):
            return 1.0 - self._tversky(tp, predicted, target)

        return self._overlap_term(y_true, y_pred, weights, reduction, tversky_loss)

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="medseg")
class FocalTverskyLoss(TverskyLoss):
    """Mean over classes of ``(1 − TI_c) ** (1/γ)`` (Abraham & Khan 2019).

    Parameters
    ----------
    alpha, beta : float
        Tversky weights of false positives and false negatives, see :class:`TverskyLoss`
        (the paper writes them the other way round: its α weighs false negatives).
    gamma : float
        Focusing parameter, the paper's best is 4/3: with ``γ > 1`` a class whose index is
        already high still has a large gradient. ``γ = 1`` is the Tversky loss.
    include_background, class_weights, smooth, batch_dice, name, dtype
        As :class:`SoftDiceLoss`.

    Notes
    -----
    The paper sums over classes; here they are averaged, so that the scale does not grow
    with their number. ``1 − TI`` is floored at 1e-7 so that the gradient stays finite
    when a class is perfectly segmented (or absent from targets and predictions).
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 4 / 3,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = SMOOTH,
        batch_dice: bool = True,
        name: str = "focal_tversky",
        dtype: str | None = None,
    ):
        super().__init__(
            alpha, beta, include_background, class_weights, smooth, batch_dice, name, dtype
        )
        self.gamma = _check_positive(type(self).__name__, "gamma", gamma)

    def _compute(self, y_true, y_pred, weights, reduction):
        def focal_tversky_loss(tp, predicted, target):
            complement = ops.maximum(1.0 - self._tversky(tp, predicted, target), FLOOR)
            return ops.power(complement, 1.0 / self.gamma)

        return self._overlap_term(y_true, y_pred, weights, reduction, focal_tversky_loss)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="medseg")
class FocalLoss(_SegmentationLoss):
    """Focal loss ``−α_t (1 − p_t)^γ log p_t``, mean over voxels (Lin et al. 2017).

    ``p_t`` is the probability of the voxel's true class and ``α_t`` that class's weight.

    Parameters
    ----------
    gamma : float
        Focusing parameter (0 gives the weighted cross-entropy; the paper uses 2).
    alpha : float, optional
        The paper's binary weighting: weight ``α`` for the foreground class(es) and
        ``1 − α`` for the background (the paper's 0.25). Exclusive with ``class_weights``.
    class_weights : sequence of float, optional
        ``α_t`` of every class, background first.
    epsilon : float
        Probabilities are clipped to ``[epsilon, 1 - epsilon]``.
    name, dtype
        As :class:`SoftDiceLoss`.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | None = None,
        class_weights: Sequence[float] | None = None,
        epsilon: float = EPSILON,
        name: str = "focal",
        dtype: str | None = None,
    ):
        super().__init__(class_weights=class_weights, name=name, dtype=dtype)
        self.gamma = float(gamma)
        if self.gamma < 0:
            raise ValueError(f"{type(self).__name__}: gamma must be >= 0, got {gamma}")
        if alpha is not None:
            if class_weights is not None:
                raise ValueError(f"{type(self).__name__}: give alpha or class_weights, not both")
            alpha = _check_fraction(type(self).__name__, "alpha", alpha)
        self.alpha = alpha
        self.epsilon = float(epsilon)

    def _compute(self, y_true, y_pred, weights, reduction):
        if self.alpha is not None:
            num_classes = y_pred.shape[-1]
            weights = ops.convert_to_tensor(
                [1.0 - self.alpha] + [self.alpha] * (num_classes - 1), dtype=y_pred.dtype
            )
        probability = ops.clip(y_pred, self.epsilon, 1.0 - self.epsilon)
        focal = -y_true * ops.power(1.0 - probability, self.gamma) * ops.log(probability)
        if weights is not None:
            focal = focal * weights
        return reduction.share_of_mean(ops.sum(focal, axis=-1))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "gamma": self.gamma,
            "alpha": self.alpha,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package="medseg")
class DiceCrossEntropyLoss(_OverlapLoss):
    """``dice_weight · (1 − mean soft Dice) + ce_weight · cross-entropy``.

    Parameters
    ----------
    dice_weight, ce_weight : float
        Weights of the two terms.
    include_background : bool
        Whether the background (class 0) enters the Dice mean.
    class_weights : sequence of float, optional
        One weight per class, background first: weights the Dice mean over classes and
        every voxel's cross-entropy by its true class.
    smooth : float
        Dice smoothing, see :func:`soft_dice`.
    epsilon : float
        Probabilities are clipped to ``[epsilon, 1 - epsilon]`` in the cross-entropy.
    batch_dice : bool
        nnU-Net's batch Dice (True) or the mean of per-sample Dice losses.
    name : str
        Name of the loss.
    dtype : str, optional
        Computation dtype; defaults to Keras's floatx.

    Notes
    -----
    ``y_true`` is one-hot ``(B, *spatial, C)``, ``y_pred`` softmax probabilities of the same
    shape (or one sigmoid channel). The loss is a scalar already reduced over the batch, the
    voxels and the replicas, hence ``reduction="none"`` (see the module docstring).
    Per-sample weights have no meaning for a batch Dice and are refused.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = SMOOTH,
        epsilon: float = EPSILON,
        batch_dice: bool = True,
        name: str = "dice_cross_entropy",
        dtype: str | None = None,
    ):
        super().__init__(include_background, class_weights, smooth, batch_dice, name, dtype)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.epsilon = float(epsilon)

    def _compute(self, y_true, y_pred, weights, reduction):
        dice = self._dice_term(y_true, y_pred, weights, reduction)
        probability = ops.clip(y_pred, self.epsilon, 1.0 - self.epsilon)
        cross_entropy = -ops.sum(y_true * ops.log(probability), axis=-1)
        if weights is not None:
            cross_entropy = cross_entropy * self._voxel_weights(y_true, weights)
        return self.dice_weight * dice + self.ce_weight * reduction.share_of_mean(cross_entropy)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dice_weight": self.dice_weight,
            "ce_weight": self.ce_weight,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package="medseg")
class ComboLoss(_OverlapLoss):
    """Combo loss ``α · L_mCE + (1 − α) · (1 − mean soft Dice)`` (Taghanaki et al. 2019).

    ``L_mCE = −mean[β g log p + (1 − β)(1 − g) log(1 − p)]`` is a binary cross-entropy of
    every kept class channel, mean over voxels and (weighted) over the channels.

    Parameters
    ----------
    alpha : float
        Weight of the cross-entropy, in [0, 1]; the Dice term gets ``1 − α``.
    beta : float
        In [0, 1]; above 0.5 false negatives cost more than false positives.
    include_background : bool
        Whether class 0's channel enters the Dice mean *and* the cross-entropy (on the
        background channel, β would weigh the foreground's false positives instead).
    class_weights : sequence of float, optional
        One per class, background first: weighted means over the classes of both terms.
    smooth, batch_dice, name, dtype
        As :class:`SoftDiceLoss`.
    epsilon : float
        Probabilities are clipped to ``[epsilon, 1 - epsilon]``.

    Notes
    -----
    The paper subtracts the Dice (a sum over classes), ``α L_mCE − (1 − α) Σ DSC``; here the
    Dice term is ``1 − mean Dice``, non-negative and independent of the number of classes.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        include_background: bool = False,
        class_weights: Sequence[float] | None = None,
        smooth: float = SMOOTH,
        epsilon: float = EPSILON,
        batch_dice: bool = True,
        name: str = "combo",
        dtype: str | None = None,
    ):
        super().__init__(include_background, class_weights, smooth, batch_dice, name, dtype)
        self.alpha = _check_fraction(type(self).__name__, "alpha", alpha)
        self.beta = _check_fraction(type(self).__name__, "beta", beta)
        self.epsilon = float(epsilon)

    def _compute(self, y_true, y_pred, weights, reduction):
        dice = self._dice_term(y_true, y_pred, weights, reduction)
        probability = ops.clip(y_pred, self.epsilon, 1.0 - self.epsilon)
        channel_ce = -(
            self.beta * y_true * ops.log(probability)
            + (1.0 - self.beta) * (1.0 - y_true) * ops.log(1.0 - probability)
        )
        cross_entropy = self._class_mean(channel_ce, weights)  # (B, *spatial)
        return self.alpha * reduction.share_of_mean(cross_entropy) + (1.0 - self.alpha) * dice

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "beta": self.beta,
            "epsilon": self.epsilon,
        }


def _overlap_arguments(config: LossConfig) -> dict:
    return {
        "include_background": config.include_background,
        "class_weights": config.class_weights,
        "smooth": config.smooth,
    }


LOSSES = {
    "dice_ce": lambda c: DiceCrossEntropyLoss(
        c.dice_weight, c.ce_weight, batch_dice=c.batch_dice, **_overlap_arguments(c)
    ),
    "dice": lambda c: SoftDiceLoss(batch_dice=c.batch_dice, **_overlap_arguments(c)),
    "classwise_dice": lambda c: ClassWiseDiceLoss(**_overlap_arguments(c)),
    "jaccard": lambda c: JaccardLoss(batch_dice=c.batch_dice, **_overlap_arguments(c)),
    "tversky": lambda c: TverskyLoss(
        c.tversky_alpha, c.tversky_beta, batch_dice=c.batch_dice, **_overlap_arguments(c)
    ),
    "focal_tversky": lambda c: FocalTverskyLoss(
        c.tversky_alpha,
        c.tversky_beta,
        c.focal_tversky_gamma,
        batch_dice=c.batch_dice,
        **_overlap_arguments(c),
    ),
    "focal": lambda c: FocalLoss(c.focal_gamma, c.focal_alpha, c.class_weights),
    "combo": lambda c: ComboLoss(
        c.combo_alpha, c.combo_beta, batch_dice=c.batch_dice, **_overlap_arguments(c)
    ),
}
"""Loss name in :class:`~medseg.config.LossConfig` → builder from that config."""


def loss_from_config(loss_config: LossConfig, num_classes: int) -> keras.losses.Loss:
    """The loss ``loss_config`` describes, for a dataset of ``num_classes`` classes.

    Parameters
    ----------
    loss_config : LossConfig
        The ``loss`` section of the experiment's config.
    num_classes : int
        Number of classes, background included (2 for a binary problem, whether the model
        ends in two softmax channels or one sigmoid channel).

    Raises
    ------
    ConfigError
        For an unknown loss name, class weights that are not one per class, or a
        parameter out of its range; the message names the ``loss.`` key.
    """
    name = loss_config.name
    if name not in LOSSES:
        raise ConfigError(f"loss.name={name!r}: use one of {', '.join(LOSSES)}")
    weights = loss_config.class_weights
    if weights is not None and len(weights) != num_classes:
        raise ConfigError(
            f"loss.class_weights has {len(weights)} values but the dataset has {num_classes} "
            "classes: give one weight per class, background first"
        )
    if name == "focal" and weights is not None and loss_config.focal_alpha is not None:
        raise ConfigError("loss.focal_alpha and loss.class_weights: set one of them, not both")
    try:
        return LOSSES[name](loss_config)
    except ValueError as err:
        raise ConfigError(f"loss.name={name!r}: {err}") from err
