"""Whole-case prediction: preprocess → sliding window → back to the source grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from medseg.inference.sliding_window import predict_sliding_window
from medseg.pipeline.preprocess import PreprocessPlan, preprocess_case, resample


def predict_case(
    model: Callable,
    image: np.ndarray,
    spacing: Sequence[float],
    plan: PreprocessPlan,
    patch_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict a label map for one case on its original grid.

    Parameters
    ----------
    model : keras.Model or callable
        Maps ``(B, *patch, C)`` float32 to ``(B, *patch, K)`` probabilities.
    image : np.ndarray
        ``(D, H, W)`` or ``(D, H, W, C)`` raw intensities.
    spacing : sequence of 3 floats
        Voxel spacing of ``image`` in array-axis order.

    Returns
    -------
    labels : np.ndarray
        ``(D, H, W)`` uint8 argmax of the probabilities on the original grid.
    probabilities : np.ndarray
        ``(D, H, W, K)`` float32, resampled back linearly from the preprocessed grid (as
        nnU-Net does: interpolate probabilities, then take the argmax).
    """
    source_shape = np.shape(image)[:3]
    prepared, _ = preprocess_case(tf.constant(image), None, tf.constant(spacing), plan)
    probs = predict_sliding_window(
        prepared.numpy(),
        model,
        patch_size=tuple(patch_size),
        num_classes=num_classes,
        overlap=overlap,
        batch_size=batch_size,
    )
    if tuple(probs.shape[:3]) != tuple(source_shape):
        probs = resample(tf.constant(probs), source_shape, "linear").numpy()
    return np.argmax(probs, axis=-1).astype(np.uint8), probs
