"""Sliding-window prediction of a whole image with a patch-based model.

A model trained on patches predicts a whole case patch by patch; overlapping patch
predictions are merged with a per-voxel importance weight (uniform, or nnU-Net's Gaussian
that trusts patch centres more than borders, where the receptive field is truncated).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["gaussian_importance", "predict_sliding_window", "window_starts"]


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


def predict_sliding_window(
    image: np.ndarray,
    predict_fn: Callable[[np.ndarray], object],
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    weighting: str = "gaussian",
    pad_value: float | None = None,
) -> np.ndarray:
    """Predict class probabilities for a whole image, patch by patch.

    Parameters
    ----------
    image : ndarray, shape ``(*spatial, C)``
        The (preprocessed) image with a trailing channel axis; 2 or 3 spatial axes.
    predict_fn : callable or keras.Model
        Maps a float32 batch ``(B, *patch_size, C)`` to probabilities
        ``(B, *patch_size, num_classes)`` (any array-like, e.g. a tensor). An object with a
        ``predict_on_batch`` method (a Keras model) is called through that method.
    patch_size : sequence of int
        Spatial shape of a patch, one entry per spatial axis of ``image``.
    num_classes : int
        Number of output channels of ``predict_fn``.
    overlap : float, optional
        Fraction of a patch shared with its neighbour along each axis, in ``[0, 1)``
        (see `window_starts`).
    batch_size : int, optional
        Number of patches per call of ``predict_fn``.
    weighting : {"gaussian", "mean"}, optional
        Per-voxel weight of a patch prediction when merging: `gaussian_importance`, or
        uniform (a plain average of the overlapping predictions).
    pad_value : float, optional
        Value used to pad axes shorter than the patch (symmetrically); defaults to the
        image minimum (background after intensity normalisation).

    Returns
    -------
    probabilities : ndarray of float32, shape ``(*spatial, num_classes)``
        For every voxel, ``sum_i w_i p_i / sum_i w_i`` over the patches ``i`` containing it,
        where ``w_i`` is the weight at the voxel's position inside patch ``i``. A weighted
        average of distributions, so it sums to 1 wherever the model's outputs do.
    """
    image = np.asarray(image, dtype=np.float32)
    patch_size = tuple(int(p) for p in patch_size)
    spatial = image.shape[:-1]
    if image.ndim < 2 or len(spatial) != len(patch_size):
        raise ValueError(
            f"image of shape {image.shape} must be (*spatial, C) with {len(patch_size)} "
            f"spatial axes to match patch_size {patch_size}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if weighting == "gaussian":
        weights = gaussian_importance(patch_size)
    elif weighting == "mean":
        weights = np.ones(patch_size, dtype=np.float32)
    else:
        raise ValueError(f"weighting must be 'gaussian' or 'mean', got {weighting!r}")
    predict = getattr(predict_fn, "predict_on_batch", predict_fn)

    # pad axes shorter than the patch, symmetrically, and remember how to crop back
    before = [max(0, p - s) // 2 for s, p in zip(spatial, patch_size, strict=True)]
    after = [max(0, p - s) - b for s, p, b in zip(spatial, patch_size, before, strict=True)]
    if any(before) or any(after):
        fill = float(image.min()) if pad_value is None else float(pad_value)
        widths = [*zip(before, after, strict=True), (0, 0)]
        image = np.pad(image, widths, mode="constant", constant_values=fill)
    padded = image.shape[:-1]

    starts = itertools.product(
        *(window_starts(s, p, overlap) for s, p in zip(padded, patch_size, strict=True))
    )
    windows = [
        tuple(slice(o, o + p) for o, p in zip(origin, patch_size, strict=True)) for origin in starts
    ]
    # float32 accumulators: the division at the end makes the merge exact for any number
    # of overlapping patches, unlike a running average
    summed = np.zeros((*padded, num_classes), dtype=np.float32)
    weight_sum = np.zeros(padded, dtype=np.float32)
    expected = (*patch_size, num_classes)
    for first in range(0, len(windows), batch_size):
        batch_windows = windows[first : first + batch_size]
        batch = np.stack([image[window] for window in batch_windows])
        probs = np.asarray(predict(batch), dtype=np.float32)
        if probs.shape != (len(batch_windows), *expected):
            raise ValueError(
                f"predict_fn returned shape {probs.shape} for a batch of shape {batch.shape}; "
                f"expected {(len(batch_windows), *expected)}"
            )
        for window, patch_probs in zip(batch_windows, probs, strict=True):
            summed[window] += weights[..., None] * patch_probs
            weight_sum[window] += weights

    merged = summed / weight_sum[..., None]
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))
    return merged[crop]
