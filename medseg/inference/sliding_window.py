"""Sliding-window prediction of a whole image with a patch-based model.

A model trained on patches predicts a whole case patch by patch; overlapping patch
predictions are merged with a per-voxel importance weight (uniform, or nnU-Net's Gaussian
that trusts patch centres more than borders, where the receptive field is truncated).
Each voxel gets ``sum_i w_i p_i / sum_i w_i`` over the patches containing it, accumulated
and divided once, so the merge is exact however many patches overlap (MIScnn's pairwise
running average is not). Each patch prediction ``p_i`` may itself be a mean over test-time
flips and over the models of an ensemble.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage

from medseg.progress import start_bar

__all__ = [
    "SlidingWindow",
    "WeightedMerger",
    "as_predictor",
    "gaussian_importance",
    "mirror_flips",
    "predict_batch",
    "predict_sliding_window",
    "sliding_window_tensor",
    "window_count",
    "window_positions",
    "window_starts",
]

# The highest overlap accepted. Per axis the step is floor(patch * (1 - overlap)), so every
# voxel is predicted about prod(patch / step) times (3D): 8 at nnU-Net's 0.5, ~10**3 at 0.9,
# ~10**4 at 0.95 and every voxel offset (patch**3, ~2 * 10**6 for a 128 patch) at 0.99. Above
# 0.95 the extra windows cost hours for no measurable gain: refused, not warned, because a
# warning would be printed just before a run that never ends.
MAX_OVERLAP = 0.95

# A case of fewer window batches gets no progress bar of its own: it takes seconds.
WINDOW_BAR_MIN_BATCHES = 32


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of the windows that tile one axis.

    Parameters
    ----------
    size : int
        Length of the axis. Must be at least ``patch``: pad smaller images first
        (`predict_sliding_window` does).
    patch : int
        Window length along the axis.
    overlap : float
        Fraction of a window shared with the next one, in ``[0, 1)``.

    Returns
    -------
    starts : list of int
        Offsets ``0, step, 2*step, ...`` with ``step = max(1, floor(patch * (1 - overlap)))``,
        then ``size - patch`` so that the last window is flush with the end. Every index in
        ``[0, size)`` is covered by at least one window ``[s, s + patch)``.

    Examples
    --------
    >>> window_starts(10, 4, 0.5)
    [0, 2, 4, 6]
    >>> window_starts(11, 4, 0.5)
    [0, 2, 4, 6, 7]
    """
    if patch < 1:
        raise ValueError(f"patch must be positive, got {patch}")
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch ({patch}); pad it first")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    # the epsilon absorbs float error, e.g. 10 * (1 - 0.9) = 0.999... must give a step of 1
    step = max(1, math.floor(patch * (1.0 - overlap) + 1e-9))
    return list(range(0, size - patch, step)) + [size - patch]


def window_positions(
    shape: Sequence[int], patch_size: Sequence[int], overlap: float
) -> Iterator[tuple[slice, ...]]:
    """The windows tiling ``shape``, one at a time: a generator, never a list.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of the (padded) image, each at least the patch.
    patch_size : sequence of int
        Spatial shape of a window.
    overlap : float
        See :func:`window_starts`.

    Yields
    ------
    tuple of slice
        One window, in the order of ``itertools.product`` over each axis's
        :func:`window_starts` (the last axis fastest). Only the per-axis starts are held
        (at most ``sum(shape)`` ints), however many windows there are.
    """
    patch_size = tuple(int(p) for p in patch_size)
    starts = [
        window_starts(int(s), p, overlap) for s, p in zip(shape, patch_size, strict=True)
    ]
    for origin in itertools.product(*starts):
        yield tuple(slice(o, o + p) for o, p in zip(origin, patch_size, strict=True))


def window_count(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """How many windows :func:`window_positions` yields, without generating them."""
    return math.prod(
        len(window_starts(int(s), int(p), overlap))
        for s, p in zip(shape, patch_size, strict=True)
    )


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """nnU-Net's Gaussian importance map for merging overlapping patch predictions.

    Parameters
    ----------
    patch_size : sequence of int
        Spatial shape of a patch.
    sigma_scale : float, optional
        Standard deviation along each axis as a fraction of the patch length.

    Returns
    -------
    weights : ndarray of float32, shape ``patch_size``
        A Gaussian centred on voxel ``patch_size // 2`` (a delta filtered with
        `scipy.ndimage.gaussian_filter`, as nnU-Net does), scaled so that its maximum is 1.
        Zeros (beyond the filter's truncation radius) are replaced by the smallest non-zero
        value, so that every voxel of a patch carries some weight.
    """
    patch_size = tuple(int(p) for p in patch_size)
    delta = np.zeros(patch_size, dtype=np.float64)
    delta[tuple(p // 2 for p in patch_size)] = 1.0
    sigmas = [p * sigma_scale for p in patch_size]
    weights = ndimage.gaussian_filter(delta, sigmas, order=0, mode="constant", cval=0.0)
    weights /= weights.max()
    nonzero = weights > 0
    weights[~nonzero] = weights[nonzero].min()
    return weights.astype(np.float32)


_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def as_predictor(model: Callable) -> Callable[[tf.Tensor], tf.Tensor]:
    """Wrap a model as a function from a float32 batch tensor to a probability tensor.

    Parameters
    ----------
    model : keras.Model or callable
        A Keras model is called as ``model(batch, training=False)`` inside a
        `tf.function` (traced once per batch shape). Any other callable gets
        the batch as a NumPy array and may return anything array-like. A model with several
        outputs (deep supervision) contributes its first, full-resolution one.

    Returns
    -------
    callable
        ``(B, *spatial, C)`` tensor → ``(B, *spatial, K)`` float32 tensor.
    """
    if isinstance(model, keras.Model):
        forward = _FORWARD.get(model)
        if forward is None:
            # traced per batch shape (a sliding window has one or two; a graph traced for
            # unknown sizes runs a third slower on CPU), and kept: cases reuse the traces.
            # A weak reference, so that the cache does not keep the model alive.
            ref = weakref.ref(model)

            @tf.function(autograph=False)
            def forward(batch):
                return tf.cast(_first_output(ref()(batch, training=False)), tf.float32)

            _FORWARD[model] = forward
        return forward

    def call(batch):
        return tf.convert_to_tensor(_first_output(model(batch.numpy())), tf.float32)

    return call


def _first_output(outputs):
    # deep supervision: the outputs are ordered from full resolution down
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, list | tuple):
        return outputs[0]
    return outputs


def mirror_flips(mirror_axes: Sequence[int], ndim: int) -> list[tuple[int, ...]]:
    """Every combination of flips along ``mirror_axes``, as batch-tensor axes.

    Parameters
    ----------
    mirror_axes : sequence of int
        Spatial axes (``0 .. ndim - 1``) to mirror; empty for no mirroring.
    ndim : int
        Number of spatial axes.

    Returns
    -------
    list of tuple of int
        ``2 ** len(mirror_axes)`` tuples of axes of a ``(B, *spatial, C)`` tensor, the
        first empty (the unflipped input).

    Examples
    --------
    >>> mirror_flips([0, 2], 3)
    [(), (1,), (3,), (1, 3)]
    """
    axes = [int(a) for a in mirror_axes]
    if len(set(axes)) != len(axes) or any(not 0 <= a < ndim for a in axes):
        raise ValueError(
            f"mirror_axes={list(mirror_axes)} must be distinct spatial axes in 0..{ndim - 1}"
        )
    flips = []
    for chosen in itertools.product((False, True), repeat=len(axes)):
        flips.append(tuple(a + 1 for a, on in zip(axes, chosen, strict=True) if on))
    return sorted(flips, key=lambda f: (len(f), f))


def predict_batch(
    predictors: Sequence[Callable[[tf.Tensor], tf.Tensor]],
    batch: tf.Tensor,
    flips: Sequence[tuple[int, ...]] = ((),),
) -> tf.Tensor:
    """Mean probabilities of every predictor over every flip of ``batch``.

    Each flipped prediction is flipped back before averaging, so ensembling and test-time
    mirroring are one average of ``len(predictors) * len(flips)`` predictions.
    """
    total, count = None, 0
    for predict in predictors:
        for axes in flips:
            probs = predict(tf.reverse(batch, axes) if axes else batch)
            if axes:
                probs = tf.reverse(probs, axes)
            total = probs if total is None else total + probs
            count += 1
    # a division, not a product with 1/count: the mean of equal values is then exact
    return total if count == 1 else total / count


class WeightedMerger:
    """Accumulates weighted patch predictions over a grid and divides once at the end
    (TorchIO's GridAggregator, MONAI's AvgMerger): ``sum_i w_i p_i / sum_i w_i`` per
    voxel, exact however many patches overlap (a running pairwise average is not).

    Patches are added with NumPy views on the host: a tf.Variable slice update copies the
    whole accumulator, and each eager op costs milliseconds.
    """

    def __init__(self, shape: Sequence[int], weights: np.ndarray):
        self.shape = tuple(int(s) for s in shape)
        self.weights = np.asarray(weights, np.float32)
        self._summed = self._weight_sum = self._scratch = None

    def add(self, window: tuple[slice, ...], probs: np.ndarray) -> None:
        """Add one patch's ``(*patch, K)`` prediction at ``window``."""
        if self._summed is None:
            self._summed = np.zeros((*self.shape, probs.shape[-1]), np.float32)
            self._weight_sum = np.zeros(self.shape, np.float32)
            self._scratch = np.empty(probs.shape, np.float32)
        self._summed[window] += np.multiply(probs, self.weights[..., None], out=self._scratch)
        self._weight_sum[window] += self.weights

    def result(self, crop: tuple[slice, ...] | None = None) -> np.ndarray:
        """The merged ``(*shape, K)`` probabilities (of ``crop`` only, if given).

        A new array: the accumulators stay as they are, so patches may still be added.
        """
        if self._summed is None:
            raise ValueError("no patch was added")
        crop = crop or tuple(slice(None) for _ in self.shape)
        return self._summed[crop] / self._weight_sum[crop][..., None]


@dataclass(frozen=True)
class SlidingWindow:
    """A sliding-window inferer configured once, called per image: ``window(image, models)``.

    Attributes
    ----------
    patch_size : tuple of int
        Spatial shape of a patch (the training patch).
    overlap, batch_size, weighting, mirror_axes, stride, pad_value
        As in :func:`predict_sliding_window`.
    """

    patch_size: tuple[int, ...]
    overlap: float = 0.5
    batch_size: int = 2
    weighting: str = "gaussian"
    mirror_axes: tuple[int, ...] = ()
    stride: int | tuple[int, ...] | None = None
    pad_value: float | None = None

    def __post_init__(self):
        if any(int(p) < 1 for p in self.patch_size):
            raise ValueError(f"patch_size {tuple(self.patch_size)} must be positive")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.overlap >= MAX_OVERLAP:
            raise ValueError(self._overlap_message())
        if self.weighting not in ("gaussian", "mean"):
            raise ValueError(f"weighting must be 'gaussian' or 'mean', got {self.weighting!r}")

    def _overlap_message(self) -> str:
        def per_voxel(overlap):
            return math.prod(
                p / max(1, math.floor(p * (1.0 - overlap) + 1e-9)) for p in self.patch_size
            )

        count = per_voxel(self.overlap)
        return (
            f"overlap {self.overlap} (--overlap / inference.overlap) must be below "
            f"{MAX_OVERLAP}: with patch {tuple(self.patch_size)} every voxel would be "
            f"predicted in about {count:,.0f} windows ({count / per_voxel(0.5):,.0f} times "
            "as many as at overlap 0.5, nnU-Net's); use 0.5, or at most 0.9"
        )

    @classmethod
    def from_plan(cls, plan, inference) -> SlidingWindow:
        """The window of a :class:`~medseg.inference.PredictionPlan` (patch, stride) with
        the settings of an :class:`~medseg.config.InferenceConfig`. For a slab model the
        window is the in-plane patch."""
        stride = plan.stride
        window = cls(
            patch_size=tuple(int(p) for p in plan.patch_size),
            overlap=float(inference.overlap),
            batch_size=int(inference.batch_size),
            weighting=inference.weighting,
            mirror_axes=tuple(inference.mirror_axes),
            stride=stride if stride is None or np.isscalar(stride) else tuple(stride),
        )
        return window.in_plane() if getattr(plan, "slab", None) else window

    def in_plane(self) -> SlidingWindow:
        """The 2D window of a slab model trained on this (k, H, W) patch: its slices are
        channels, so the window, the stride and the mirrored axes are the in-plane ones."""
        stride = self.stride
        return dataclasses.replace(
            self,
            patch_size=tuple(self.patch_size[1:]),
            mirror_axes=tuple(a - 1 for a in self.mirror_axes if a > 0),
            stride=stride if stride is None or np.isscalar(stride) else tuple(stride)[-2:],
        )

    def __call__(self, image, model, num_classes: int | None = None) -> tf.Tensor:
        """``(*spatial, K)`` probabilities of ``image`` ``(*spatial, C)`` (a tf.Tensor)."""
        image = tf.convert_to_tensor(image, tf.float32)
        patch_size = tuple(int(p) for p in self.patch_size)
        ndim = len(patch_size)
        spatial = tuple(int(s) for s in image.shape[:-1])
        if image.shape.rank < 2 or len(spatial) != ndim:
            raise ValueError(
                f"image of shape {tuple(image.shape)} must be (*spatial, C) with {ndim} "
                f"spatial axes to match patch_size {patch_size}"
            )
        if self.weighting == "gaussian":
            weights = gaussian_importance(patch_size)
        else:
            weights = np.ones(patch_size, dtype=np.float32)
        models = list(model) if isinstance(model, list | tuple) else [model]
        if not models:
            raise ValueError("no model given")
        predictors = [as_predictor(m) for m in models]
        flips = mirror_flips(self.mirror_axes, ndim)

        # full-image mode: an image no larger than a patch is predicted in one pass,
        # padded only up to the network's stride (a multiple of it is all a U-Net needs)
        stride = self.stride
        whole = stride is not None and all(
            s <= p for s, p in zip(spatial, patch_size, strict=True)
        )
        if whole:
            strides = (int(stride),) * ndim if np.isscalar(stride) else tuple(int(s) for s in stride)
            target = [-(-s // k) * k for s, k in zip(spatial, strides, strict=True)]
        else:
            target = [max(s, p) for s, p in zip(spatial, patch_size, strict=True)]
        # pad symmetrically and remember how to crop back
        before = [(t - s) // 2 for s, t in zip(spatial, target, strict=True)]
        if any(t > s for s, t in zip(spatial, target, strict=True)):
            fill = tf.reduce_min(image) if self.pad_value is None else float(self.pad_value)
            widths = [(b, t - s - b) for s, t, b in zip(spatial, target, before, strict=True)]
            image = tf.pad(image, [*widths, (0, 0)], constant_values=fill)
        crop = tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))

        def checked(probs, batch):
            expected = (*batch.shape[:-1], num_classes or probs.shape[-1])
            if tuple(probs.shape) != tuple(expected):
                raise ValueError(
                    f"the model returned shape {tuple(probs.shape)} for a batch of shape "
                    f"{tuple(batch.shape)}; expected {tuple(expected)}"
                )
            return probs

        if whole:
            batch = image[None]
            return checked(predict_batch(predictors, batch, flips), batch)[0][crop]

        padded = tuple(int(s) for s in image.shape[:-1])
        # generated a batch at a time: the windows are never listed whole
        windows = window_positions(padded, patch_size, self.overlap)
        # only whole batches go through TensorFlow; cutting and merging are host views
        image = image.numpy()
        merger = WeightedMerger(padded, weights)
        # a nested bar under the per-case one, only for cases of many batches
        batches = -(-window_count(padded, patch_size, self.overlap) // self.batch_size)
        with start_bar(
            batches, "windows", unit="batch", leave=False, min_total=WINDOW_BAR_MIN_BATCHES
        ) as bar:
            while batch_windows := list(itertools.islice(windows, self.batch_size)):
                batch = tf.constant(np.stack([image[window] for window in batch_windows]))
                probs = np.asarray(checked(predict_batch(predictors, batch, flips), batch))
                for index, window in enumerate(batch_windows):
                    merger.add(window, probs[index])
                bar.update()
        return tf.constant(merger.result(crop))


def sliding_window_tensor(
    image,
    model: Callable | Sequence[Callable],
    patch_size: Sequence[int],
    num_classes: int | None = None,
    overlap: float = 0.5,
    batch_size: int = 2,
    weighting: str = "gaussian",
    pad_value: float | None = None,
    *,
    mirror_axes: Sequence[int] = (),
    stride: int | Sequence[int] | None = None,
) -> tf.Tensor:
    """`predict_sliding_window` returning a `tf.Tensor` (what `to_source_grid` takes):
    a :class:`SlidingWindow` of these settings, applied once."""
    window = SlidingWindow(
        tuple(int(p) for p in patch_size),
        overlap,
        batch_size,
        weighting,
        tuple(mirror_axes),
        stride if stride is None or np.isscalar(stride) else tuple(stride),
        pad_value,
    )
    return window(image, model, num_classes)


def predict_sliding_window(
    image: np.ndarray,
    predict_fn: Callable | Sequence[Callable],
    patch_size: Sequence[int],
    num_classes: int | None = None,
    overlap: float = 0.5,
    batch_size: int = 2,
    weighting: str = "gaussian",
    pad_value: float | None = None,
    *,
    mirror_axes: Sequence[int] = (),
    stride: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Predict class probabilities for a whole image, patch by patch.

    Parameters
    ----------
    image : array-like, shape ``(*spatial, C)``
        The (preprocessed) image with a trailing channel axis; 2 or 3 spatial axes.
    predict_fn : keras.Model or callable, or a list of them
        Maps a float32 batch ``(B, *patch_size, C)`` to probabilities
        ``(B, *patch_size, num_classes)`` (see `as_predictor`: Keras models run in one
        `tf.function`, other callables get NumPy arrays). Several models form an ensemble:
        their probabilities are averaged.
    patch_size : sequence of int
        Spatial shape of a patch, one entry per spatial axis of ``image``.
    num_classes : int, optional
        Number of output channels of ``predict_fn``; checked if given, else taken from the
        first prediction.
    overlap : float, optional
        Fraction of a patch shared with its neighbour along each axis, in ``[0, 1)``
        (see `window_starts`).
    batch_size : int, optional
        Number of patches per forward pass.
    weighting : {"gaussian", "mean"}, optional
        Per-voxel weight of a patch prediction when merging: `gaussian_importance`, or
        uniform (a plain average of the overlapping predictions).
    pad_value : float, optional
        Value used to pad axes shorter than the patch (symmetrically); defaults to the
        image minimum (background after intensity normalisation).
    mirror_axes : sequence of int, optional
        Test-time mirroring: every patch is also predicted flipped along each combination
        of these spatial axes (``2 ** len(mirror_axes)`` passes), flipped back and averaged.
    stride : int or sequence of int, optional
        Total down-sampling factor of the network (``2 ** (depth - 1)`` for a U-Net). If
        given, an image no larger than a patch along every axis is predicted whole in one
        pass, padded only to a multiple of ``stride``; otherwise it is padded to the patch.

    Returns
    -------
    probabilities : ndarray of float32, shape ``(*spatial, num_classes)``
        For every voxel, ``sum_i w_i p_i / sum_i w_i`` over the patches ``i`` containing it,
        where ``w_i`` is the weight at the voxel's position inside patch ``i`` and ``p_i``
        the (ensemble and mirror) mean prediction. A weighted average of distributions, so
        it sums to 1 wherever the model's outputs do.
    """
    return sliding_window_tensor(
        image,
        predict_fn,
        patch_size,
        num_classes,
        overlap,
        batch_size,
        weighting,
        pad_value,
        mirror_axes=mirror_axes,
        stride=stride,
    ).numpy()
