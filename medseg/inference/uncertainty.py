"""Voxel-wise uncertainty of a prediction from several probability samples.

A sample is one probability map of the whole case on its source grid: one test-time flip
(``tta``), one ensemble member (``ensemble``) or one stochastic forward pass with the
model's Dropout layers active (``mc-dropout``, Gal & Ghahramani 2016). From the samples
``p_s`` (``s = 1 .. S``) and their mean ``p̄``:

- predictive entropy ``H[p̄] = -Σ_k p̄_k ln p̄_k``, in nats (natural log; at most
  ``ln K`` for ``K`` classes): total uncertainty;
- mutual information ``H[p̄] - mean_s H[p_s]`` (the BALD score), in nats: the part of it
  due to disagreement between the samples, 0 when they all agree;
- the variance of each class's probability over the samples, averaged over classes.

The per-structure summary (:func:`uncertainty_summary`) gives the mean entropy inside each
predicted structure and along its one-voxel boundary, and the expected Dice: the mean Dice
of each sample's argmax against the consensus segmentation (the argmax of ``p̄``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage

from medseg.inference.sliding_window import SlidingWindow, as_predictor, mirror_flips

__all__ = [
    "UNCERTAINTY_METHODS",
    "SampleStatistics",
    "class_variance",
    "dropout_model",
    "mutual_information",
    "predictive_entropy",
    "sample_sets",
    "uncertainty_summary",
]

#: what ``--uncertainty`` / ``inference.uncertainty`` accept
UNCERTAINTY_METHODS = ("none", "tta", "ensemble", "mc-dropout")

# 0 ln 0 = 0: probabilities are clipped to this before the log (the product is then ~1e-37)
_TINY = np.float32(1e-38)


def predictive_entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy of class probabilities, in nats (natural logarithm).

    Parameters
    ----------
    probs : array-like, shape ``(..., K)``
        Probabilities summing to 1 along ``axis`` (e.g. the mean over samples).
    axis : int, optional
        The class axis.

    Returns
    -------
    ndarray of float32
        ``-Σ_k p_k ln p_k`` per voxel, in ``[0, ln K]``; a class of probability 0
        contributes 0.
    """
    probs = np.asarray(probs, np.float32)
    entropy = -np.sum(probs * np.log(np.maximum(probs, _TINY)), axis=axis)
    return np.maximum(entropy, 0.0).astype(np.float32, copy=False)  # -0.0 and rounding


def mutual_information(samples: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Mutual information between the prediction and the sample, in nats.

    Parameters
    ----------
    samples : array-like, shape ``(S, ..., K)``
        ``S`` probability maps of the same case (flips, ensemble members, dropout passes).

    Returns
    -------
    ndarray of float32, shape ``(...)``
        ``H[mean_s p_s] - mean_s H[p_s]`` per voxel (the entropy of the mean minus the mean
        of the entropies), clipped at 0 against rounding; 0 where every sample agrees.
    """
    samples = np.asarray(samples, np.float32)
    if samples.ndim < 2 or samples.shape[0] < 2:
        raise ValueError(
            f"mutual information needs at least 2 samples on the first axis, got shape "
            f"{samples.shape}"
        )
    mean_entropy = np.mean([predictive_entropy(s) for s in samples], axis=0)
    return np.maximum(predictive_entropy(samples.mean(axis=0)) - mean_entropy, 0.0).astype(
        np.float32
    )


def class_variance(samples: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Variance of each class's probability over the samples, averaged over the classes.

    Parameters
    ----------
    samples : array-like, shape ``(S, ..., K)``

    Returns
    -------
    ndarray of float32, shape ``(...)``
        ``mean_k var_s p_{s,k}`` (population variance, ``ddof=0``).
    """
    samples = np.asarray(samples, np.float32)
    return samples.var(axis=0).mean(axis=-1).astype(np.float32)


class SampleStatistics:
    """Per-voxel statistics of probability samples, accumulated one sample at a time.

    Only sums are held (two ``(*shape, K)`` and one ``(*shape)`` float32 array, plus one
    uint8 label map per sample), never the samples themselves: ``S`` full-resolution
    probability maps of a CT would not fit in memory.
    """

    def __init__(self):
        self.count = 0
        self.labels: list[np.ndarray] = []  # each sample's argmax, for the expected Dice
        self._sum = self._squares = self._entropy = None

    def add(self, probs: np.ndarray) -> None:
        """Add one sample's ``(*shape, K)`` probabilities."""
        probs = np.asarray(probs, np.float32)
        if self._sum is None:
            self._sum = np.zeros(probs.shape, np.float32)
            self._squares = np.zeros(probs.shape, np.float32)
            self._entropy = np.zeros(probs.shape[:-1], np.float32)
        elif probs.shape != self._sum.shape:
            raise ValueError(
                f"sample {self.count} has shape {probs.shape}, the first {self._sum.shape}"
            )
        self._sum += probs
        self._squares += probs * probs
        self._entropy += predictive_entropy(probs)
        self.labels.append(np.argmax(probs, axis=-1).astype(np.uint8))
        self.count += 1

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError("no sample was added")

    def mean(self) -> np.ndarray:
        """The mean probabilities ``p̄``, ``(*shape, K)`` float32."""
        self._check()
        return self._sum / np.float32(self.count)

    def entropy(self) -> np.ndarray:
        """:func:`predictive_entropy` of the mean, in nats."""
        return predictive_entropy(self.mean())

    def mutual_information(self) -> np.ndarray:
        """:func:`mutual_information` of the samples, in nats (needs 2 samples)."""
        self._check()
        if self.count < 2:
            raise ValueError("mutual information needs at least 2 samples, got 1")
        mean_entropy = self._entropy / np.float32(self.count)
        return np.maximum(self.entropy() - mean_entropy, 0.0).astype(np.float32)

    def variance(self) -> np.ndarray:
        """:func:`class_variance` of the samples: ``E[p²] - E[p]²``, mean over classes."""
        mean = self.mean()
        variance = self._squares / np.float32(self.count) - mean * mean
        return np.maximum(variance, 0.0).mean(axis=-1).astype(np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0  # both empty: the sample agrees that the structure is absent
    return 2.0 * int(np.count_nonzero(a & b)) / total


def _mean_or_none(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(values[mask].mean(dtype=np.float64)) if mask.any() else None


def uncertainty_summary(
    seg: np.ndarray,
    entropy: np.ndarray,
    samples: Sequence[np.ndarray],
    classes: Sequence[str],
    mutual_info: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-structure uncertainty of one case, as a JSON-ready dict.

    Parameters
    ----------
    seg : ndarray of int, shape ``(D, H, W)``
        The consensus segmentation (argmax of the mean probabilities).
    entropy : ndarray, shape of ``seg``
        :func:`predictive_entropy` of the mean probabilities, in nats.
    samples : sequence of ndarray
        Each sample's label map (shape of ``seg``) or probabilities (``(*seg.shape, K)``,
        reduced to their argmax).
    classes : sequence of str
        Class names, background first; one entry per foreground class is reported.
    mutual_info : ndarray, optional
        :func:`mutual_information`; adds each structure's mean of it.

    Returns
    -------
    dict
        ``units`` ("nats"), ``samples`` (S), ``mean_entropy`` (whole case) and
        ``structures``: per foreground class name, ``label``, ``voxels``,
        ``mean_entropy`` (inside the predicted structure), ``boundary_voxels`` and
        ``boundary_mean_entropy`` (the one-voxel shell: the mask minus its erosion,
        6-connected), ``mean_mutual_info`` if given, ``expected_dice`` (mean over samples)
        and ``dice_per_sample``. Means over no voxel are None; a structure absent from the
        consensus and a sample scores Dice 1.
    """
    seg = np.asarray(seg)
    entropy = np.asarray(entropy)
    if entropy.shape != seg.shape:
        raise ValueError(f"entropy shape {entropy.shape} differs from seg shape {seg.shape}")
    if mutual_info is not None and np.shape(mutual_info) != seg.shape:
        raise ValueError(
            f"mutual_info shape {np.shape(mutual_info)} differs from seg shape {seg.shape}"
        )
    labels = []
    for index, sample in enumerate(samples):
        sample = np.asarray(sample)
        if sample.shape == (*seg.shape, sample.shape[-1]) and sample.ndim == seg.ndim + 1:
            sample = np.argmax(sample, axis=-1)
        if sample.shape != seg.shape:
            raise ValueError(
                f"sample {index} has shape {sample.shape}: expected a label map {seg.shape} "
                f"or probabilities {(*seg.shape, 'K')}"
            )
        labels.append(sample)
    if not labels:
        raise ValueError("no sample given: the expected Dice needs at least one")
    structures = {}
    for label, name in enumerate(classes):
        if label == 0:
            continue
        mask = seg == label
        boundary = mask & ~ndimage.binary_erosion(mask)
        dice = [_dice(sample == label, mask) for sample in labels]
        entry = {
            "label": label,
            "voxels": int(np.count_nonzero(mask)),
            "mean_entropy": _mean_or_none(entropy, mask),
            "boundary_voxels": int(np.count_nonzero(boundary)),
            "boundary_mean_entropy": _mean_or_none(entropy, boundary),
            "expected_dice": float(np.mean(dice)),
            "dice_per_sample": dice,
        }
        if mutual_info is not None:
            entry["mean_mutual_info"] = _mean_or_none(np.asarray(mutual_info), mask)
        structures[str(name)] = entry
    return {
        "units": "nats (natural log)",
        "max_entropy": math.log(max(len(classes), 1)),
        "samples": len(labels),
        "mean_entropy": float(entropy.mean(dtype=np.float64)) if entropy.size else None,
        "structures": structures,
    }


# -- samples ----------------------------------------------------------------------------


class _Flipped:
    """A model applied to a flipped batch, its output flipped back: one TTA sample."""

    def __init__(self, model: Callable, axes: tuple[int, ...]):
        self.model, self.axes = model, axes
        self._predict = as_predictor(model)
        self.__qualname__ = f"flipped{axes}"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        probs = self._predict(tf.reverse(tf.convert_to_tensor(batch, tf.float32), self.axes))
        return np.asarray(tf.reverse(probs, self.axes))


def _dropout_layers(model: keras.Model) -> list[keras.layers.Layer]:
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _dropout_layers(layer)
        elif isinstance(layer, keras.layers.Dropout) and float(layer.rate) > 0:
            found.append(layer)
    return found


_MC_CLASSES: dict[type, type] = {}


def _always_dropping(cls: type) -> type:
    # the same Dropout class, called as in training whatever the model is called with:
    # model(x, training=True) would also switch batch norm to batch statistics
    if cls not in _MC_CLASSES:

        def call(self, inputs, training=None):
            return cls.call(self, inputs, training=True)

        _MC_CLASSES[cls] = type(f"MonteCarlo{cls.__name__}", (cls,), {"call": call})
    return _MC_CLASSES[cls]


class _DropoutModel:
    """A model whose Dropout layers drop at inference; every other layer (and weight) is
    the original's. ``reset()`` rewinds the dropout masks' random streams to their start,
    so each case gets the same masks under a seed."""

    def __init__(self, model: keras.Model, seed: int | None, name: str):
        counter = iter(range(1 << 30))

        def clone(layer):
            if isinstance(layer, keras.layers.Dropout) and float(layer.rate) > 0:
                config = layer.get_config()
                if seed is not None:  # one stream per layer, all fixed by the seed
                    config["seed"] = int(seed) * 1009 + next(counter)
                return _always_dropping(type(layer)).from_config(config)
            return layer  # shared: same weights, same batch norm statistics

        try:
            self.model = keras.models.clone_model(model, clone_function=clone, recursive=True)
        except Exception as err:  # subclassed models have no graph to clone
            raise ValueError(
                f"model {name}: mc-dropout needs a Functional or Sequential Keras model "
                f"(its Dropout layers are re-wired), cannot clone it: {err}"
            ) from err
        self._generators = [
            layer.seed_generator for layer in _dropout_layers(self.model)
            if getattr(layer, "seed_generator", None) is not None
        ]
        self._start = [np.asarray(g.state.numpy()) for g in self._generators]

    def reset(self) -> None:
        for generator, state in zip(self._generators, self._start, strict=True):
            generator.state.assign(state)


def dropout_model(model: Callable, seed: int | None = None, name: str | None = None):
    """``model`` with its Dropout layers active at inference (Monte-Carlo dropout).

    Parameters
    ----------
    model : keras.Model
        A Functional or Sequential model with at least one Dropout layer of rate > 0
        (a medseg network trained with ``model.dropout`` > 0).
    seed : int, optional
        Fixes the dropout masks: the same seed gives the same samples.
    name : str, optional
        How the model is named in errors (default its Keras name).

    Returns
    -------
    keras.Model
        Sharing every layer and weight of ``model`` except the Dropout layers, which are
        called with ``training=True`` whatever the model is called with; batch and
        instance normalisation keep their inference behaviour (``model(x, training=True)``
        would switch batch norm to batch statistics).

    Raises
    ------
    ValueError
        The model has no Dropout layer (naming it and the ``model.dropout`` config key),
        or is not a Keras model that can be cloned.
    """
    return _dropout_wrapper(model, seed, name).model


def _dropout_wrapper(model, seed, name) -> _DropoutModel:
    name = name or getattr(model, "name", None) or getattr(model, "__qualname__", None) or (
        type(model).__qualname__
    )
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"model {name}: mc-dropout needs a Keras model with Dropout layers, got a "
            f"{type(model).__qualname__}"
        )
    if not _dropout_layers(model):
        raise ValueError(
            f"model {name} has no Dropout layer, so --uncertainty mc-dropout "
            "(inference.uncertainty) would give identical samples: train it with dropout "
            "(config key model.dropout, e.g. model.dropout=0.1), or use --uncertainty tta or "
            "ensemble"
        )
    return _DropoutModel(model, seed, name)


def sample_sets(
    models: Sequence[Callable],
    window: SlidingWindow,
    method: str,
    samples: int = 10,
    seed: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[list[tuple[list[Callable], SlidingWindow]], Callable[[], None]]:
    """What produces each sample: a list of ``(models, window)``, and a reset function.

    Checked before anything is predicted, so a refused request costs nothing.

    Parameters
    ----------
    models : sequence of callable
        The model, or an ensemble's members.
    window : SlidingWindow
        The configured inferer (its ``mirror_axes`` are the TTA flips).
    method : {"tta", "ensemble", "mc-dropout"}
        ``tta``: one sample per flip of ``mirror_flips(window.mirror_axes)`` (each the
        members' mean); ``ensemble``: one sample per member (each with the window's
        mirroring); ``mc-dropout``: ``samples`` stochastic passes (each the members' mean,
        with mirroring).
    samples : int, optional
        Number of mc-dropout passes, at least 2.
    seed : int, optional
        Fixes the mc-dropout masks.
    names : sequence of str, optional
        How each model is named in errors.

    Returns
    -------
    sets : list of (list of callable, SlidingWindow)
    reset : callable
        Call before each case: rewinds the mc-dropout random streams (a no-op otherwise),
        so that a case's samples do not depend on the cases predicted before it.
    """
    models = list(models)
    names = list(names) if names else [getattr(m, "name", str(i)) for i, m in enumerate(models)]
    if method not in UNCERTAINTY_METHODS or method == "none":
        choices = ", ".join(repr(m) for m in UNCERTAINTY_METHODS[1:])
        raise ValueError(
            f"uncertainty {method!r} (--uncertainty / inference.uncertainty) is not one of "
            f"{choices}"
        )
    if method == "tta":
        if not window.mirror_axes:
            raise ValueError(
                "--uncertainty tta (inference.uncertainty='tta') takes its samples from "
                "test-time mirroring, which is off: add --mirror (or set "
                "inference.mirror_axes, e.g. [0, 1, 2])"
            )
        plain = dataclasses.replace(window, mirror_axes=())
        flips = mirror_flips(window.mirror_axes, len(window.patch_size))
        sets = [([_Flipped(m, f) if f else m for m in models], plain) for f in flips]
        return sets, lambda: None
    if method == "ensemble":
        if len(models) < 2:
            raise ValueError(
                f"--uncertainty ensemble (inference.uncertainty='ensemble') needs at least 2 "
                f"models, got {len(models)}: repeat --model or give --ensemble ensemble.json"
            )
        return [([m], window) for m in models], lambda: None
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 2:
        raise ValueError(
            f"inference.uncertainty_samples (--uncertainty-samples) must be an integer of at "
            f"least 2 for mc-dropout, got {samples!r}"
        )
    wrappers = [
        _dropout_wrapper(m, None if seed is None else int(seed) + i, n)
        for i, (m, n) in enumerate(zip(models, names, strict=True))
    ]

    def reset():
        for wrapper in wrappers:
            wrapper.reset()

    return [([w.model for w in wrappers], window) for _ in range(int(samples))], reset
