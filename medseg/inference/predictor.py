"""Whole-case prediction: preprocess → sliding window → back to the source grid."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from medseg.inference.sliding_window import sliding_window_tensor
from medseg.pipeline.preprocess import PreprocessPlan, anisotropic_axis, preprocess_case
from medseg.pipeline.spatial import resize_axis

__all__ = ["predict_case", "resample_chunks", "slabs", "to_source_grid"]

# output slices resampled at a time: bounds the full-resolution float working memory
_CHUNK_SLICES = 16


def predict_case(
    model: Callable | Sequence[Callable],
    image: np.ndarray,
    spacing: Sequence[float],
    plan: PreprocessPlan,
    patch_size: Sequence[int],
    num_classes: int | None = None,
    overlap: float = 0.5,
    batch_size: int = 2,
    *,
    weighting: str = "gaussian",
    mirror_axes: Sequence[int] = (),
    stride: int | None = None,
    probabilities: bool = True,
    slab: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict a label map for one case on its original grid.

    Parameters
    ----------
    model : keras.Model or callable, or a list of them
        Maps ``(B, *patch, C)`` float32 to ``(B, *patch, K)`` probabilities; a list is an
        ensemble (e.g. the fold models of a cross-validation) whose probabilities are
        averaged. Multi-output models contribute their first (full-resolution) output.
    image : np.ndarray
        ``(D, H, W)`` or ``(D, H, W, C)`` raw intensities; no label needed.
    spacing : sequence of 3 floats
        Voxel spacing of ``image`` in array-axis order.
    plan : PreprocessPlan
        The preprocessing the model was trained with, applied to the whole volume once.
    patch_size : sequence of 3 ints
        Sliding-window size (the training patch size).
    num_classes : int, optional
        Checked against the model's output if given.
    overlap, batch_size, weighting, mirror_axes, stride
        See :func:`~medseg.inference.predict_sliding_window`.
    probabilities : bool, optional
        Also return the probabilities on the original grid (``K`` floats per voxel: for a
        large CT, several times the memory of the image). Labels alone are computed slab
        by slab.
    slab : int, optional
        The model is a 2D slab model (``patch.mode="slice"``) taking ``slab`` slices
        stacked as channels: every slice of the preprocessed volume is predicted from the
        slab centred on it (the volume's first and last slices mirrored beyond its ends),
        with a 2D sliding window of ``patch_size[1:]``.

    Returns
    -------
    labels : np.ndarray
        ``(D, H, W)`` uint8 argmax of the probabilities on the original grid.
    probabilities : np.ndarray or None
        ``(D, H, W, K)`` float32, resampled back from the preprocessed grid as the image
        was resampled to it (as nnU-Net does: interpolate probabilities, then take the
        argmax); outside the plan's crop box, background. None unless asked.
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (D, H, W) or (D, H, W, C), got shape {image.shape}")
    source_shape = tuple(int(s) for s in image.shape[:3])
    spacing_tensor = tf.constant(spacing, tf.float64)
    prepared, _, (start, stop) = preprocess_case(
        tf.convert_to_tensor(image), None, spacing_tensor, plan, return_box=True
    )
    window = dict(
        num_classes=num_classes,
        overlap=overlap,
        batch_size=batch_size,
        weighting=weighting,
        mirror_axes=mirror_axes,
        stride=stride,
    )
    if slab is None:
        probs = sliding_window_tensor(prepared, model, patch_size, **window)
    else:
        probs = _predict_slabs(prepared, model, slab, patch_size, window)
    nearest_axis = -1
    if plan.target_spacing is not None:
        # back from the plan's spacing to the source's, under the same anisotropy rule
        nearest_axis = int(
            anisotropic_axis(plan.target_spacing, spacing, plan.anisotropy_threshold)
        )
    box = (tuple(int(v) for v in start.numpy()), tuple(int(v) for v in stop.numpy()))
    return to_source_grid(probs, source_shape, probabilities, box=box, nearest_axis=nearest_axis)


def slabs(volume: tf.Tensor, k: int) -> Iterator[tf.Tensor]:
    """Each slice's ``k``-slice slab as a 2D input ``(H, W, k*C)``, in slice order.

    The slab of slice ``z`` holds slices ``z - k//2 .. z + k//2``, mirrored beyond the
    volume's ends; channels are slice-major, as in training
    (:func:`~medseg.pipeline.patches.slab_to_slice`).
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"slab={k}: slab models take an odd number of slices")
    half = k // 2
    depth = int(volume.shape[0])
    index = np.arange(-half, depth + half)
    index = np.where(index < 0, -index - 1, index)  # mirrored, edge slice included
    index = np.where(index >= depth, 2 * depth - index - 1, index)
    padded = tf.gather(volume, np.clip(index, 0, depth - 1))
    h, w, c = (int(v) for v in volume.shape[1:])
    for z in range(depth):
        block = padded[z : z + k]
        yield tf.reshape(tf.transpose(block, [1, 2, 0, 3]), [h, w, k * c])


def _predict_slabs(prepared, model, k, patch_size, window) -> tf.Tensor:
    if len(patch_size) != 3 or int(patch_size[0]) != k:
        raise ValueError(
            f"slab={k} needs the training patch size (k, H, W) with k = {k}, got "
            f"{tuple(patch_size)}"
        )
    stride = window["stride"]
    if stride is not None and not np.isscalar(stride):
        window = {**window, "stride": tuple(stride)[-2:]}
    mirror = [a - 1 for a in window["mirror_axes"] if a > 0]  # in-plane axes only
    window = {**window, "mirror_axes": mirror}
    plane = tuple(int(p) for p in patch_size[1:])
    return tf.stack([sliding_window_tensor(x, model, plane, **window) for x in slabs(prepared, k)])


def to_source_grid(
    probs: tf.Tensor,
    source_shape: Sequence[int],
    probabilities: bool = True,
    *,
    box: tuple[Sequence[int], Sequence[int]] | None = None,
    nearest_axis: int = -1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample ``(d, h, w, K)`` probabilities to the source grid and take the argmax.

    Undoes :func:`~medseg.pipeline.preprocess.preprocess_case`: resampling (linear, as
    :func:`~medseg.pipeline.preprocess.resample`; nearest along ``nearest_axis``), slab by
    slab, into the crop ``box``; voxels outside it are background (class 0).

    Parameters
    ----------
    probs : tf.Tensor
        ``(d, h, w, K)`` probabilities on the preprocessed grid.
    source_shape : sequence of 3 int
        Shape of the original image.
    probabilities : bool, optional
        Also return the resampled probabilities.
    box : (start, stop), optional
        Where the preprocessed grid lies in the source grid (``stop`` exclusive); default
        the whole grid.
    nearest_axis : int, optional
        Axis resampled by nearest neighbour (-1: none), see
        :func:`~medseg.pipeline.preprocess.anisotropic_axis`.

    Returns
    -------
    labels : np.ndarray
        ``source_shape`` uint8.
    probabilities : np.ndarray or None
        ``(*source_shape, K)`` float32 if ``probabilities``.
    """
    source_shape = tuple(int(s) for s in source_shape)
    start, stop = box if box is not None else ((0, 0, 0), source_shape)
    start, stop = tuple(int(v) for v in start), tuple(int(v) for v in stop)
    inner = tuple(b - a for a, b in zip(start, stop, strict=True))
    num_classes = int(probs.shape[-1])
    labels = np.zeros(source_shape, np.uint8)
    full = None
    if probabilities:
        full = np.zeros((*source_shape, num_classes), np.float32)
        full[..., 0] = 1.0  # outside the crop box: background
    region = (slice(start[1], stop[1]), slice(start[2], stop[2]))
    for first, chunk in resample_chunks(probs, inner, nearest_axis=nearest_axis):
        rows = slice(start[0] + first, start[0] + first + int(chunk.shape[0]))
        labels[(rows, *region)] = tf.cast(tf.argmax(chunk, axis=-1), tf.uint8).numpy()
        if full is not None:
            full[(rows, *region)] = chunk.numpy()
    return labels, full


def resample_chunks(
    volume: tf.Tensor,
    new_shape: Sequence[int],
    slices: int = _CHUNK_SLICES,
    nearest_axis: int = -1,
) -> Iterator[tuple[int, tf.Tensor]]:
    """:func:`~medseg.pipeline.preprocess.resample`, a slab of output slices at a time.

    The same separable interpolation in the same axis order (:func:`resize_axis` along
    axis 0, then 1, then 2; half-pixel-centre coordinates ``(o + 0.5) * in / out - 0.5``
    clamped at the ends), but each slab reads only the input slices it interpolates from:
    memory is that of one slab at full resolution, not of the volume.

    Parameters
    ----------
    volume : tf.Tensor
        ``(d, h, w, C)`` float32.
    new_shape : sequence of 3 int
        Output spatial shape ``(D, H, W)``.
    slices : int, optional
        Output slices per slab.
    nearest_axis : int, optional
        Axis interpolated by nearest neighbour instead (-1: none).

    Yields
    ------
    start : int
        Index of the slab's first output slice.
    slab : tf.Tensor
        ``(n, H, W, C)`` float32, output slices ``start .. start + n - 1``.
    """
    volume = tf.convert_to_tensor(volume, tf.float32)
    depth = int(volume.shape[0])
    out_depth, out_height, out_width = (int(s) for s in new_shape)
    # axis 0 by hand, in float64 as resize_axis computes it, so slabs match resample()
    o = np.arange(out_depth, dtype=np.float64)
    coords = np.clip((o + 0.5) * depth / out_depth - 0.5, 0.0, depth - 1.0)
    lower = np.floor(coords)
    fraction = coords - lower
    if nearest_axis == 0:
        fraction = (fraction >= 0.5).astype(np.float64)
    lower = lower.astype(np.int64)
    upper = np.minimum(lower + 1, depth - 1)
    for first in range(0, out_depth, slices):
        last = min(first + slices, out_depth)
        top = tf.gather(volume, lower[first:last])
        bottom = tf.gather(volume, upper[first:last])
        weight = tf.constant(fraction[first:last].astype(np.float32))[:, None, None, None]
        slab = top + (bottom - top) * weight
        for axis, size in ((1, out_height), (2, out_width)):
            slab = resize_axis(slab, axis, size, nearest=tf.constant(nearest_axis == axis))
        yield first, slab
