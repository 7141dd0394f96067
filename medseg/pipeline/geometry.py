"""Where a preprocessed case lies in its source grid, and the way back.

:func:`prepare_case` preprocesses a whole image for prediction (as
:func:`~medseg.pipeline.preprocess.preprocess_case` does in training) and returns, beside
it, a :class:`CaseGeometry`: the source shape, the crop box and the resampling's nearest
axis. ``geometry.invert(probabilities)`` undoes the preprocessing's geometry, so the
inverse lives next to the forward resampling instead of being copied by each caller.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from medseg.pipeline.preprocess import (
    MAX_RESAMPLED_VOXELS,
    PreprocessPlan,
    anisotropic_axis,
    preprocess_with_box,
)
from medseg.pipeline.spatial import resize_axis

__all__ = ["CaseGeometry", "prepare_case", "resample_chunks", "to_source_grid"]

# output slices resampled at a time: bounds the full-resolution float working memory
_CHUNK_SLICES = 16


@dataclass(frozen=True)
class CaseGeometry:
    """How a case's preprocessed grid maps back to its source grid.

    Attributes
    ----------
    source_shape : tuple of int
        Spatial shape of the source image.
    start, stop : tuple of int
        The crop box in the source grid (``stop`` exclusive; the whole grid without a crop).
    nearest_axis : int
        Axis the resampling interpolated by nearest neighbour (-1: none, or no resampling).
    """

    source_shape: tuple[int, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    nearest_axis: int = -1

    def invert(
        self, probabilities: tf.Tensor, keep_probabilities: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and probabilities) on the source grid: :func:`to_source_grid`."""
        return to_source_grid(
            probabilities,
            self.source_shape,
            keep_probabilities,
            box=(self.start, self.stop),
            nearest_axis=self.nearest_axis,
        )


def prepare_case(
    image,
    spacing: Sequence[float],
    plan: PreprocessPlan,
    *,
    max_voxels: int = MAX_RESAMPLED_VOXELS,
    name: str | None = None,
) -> tuple[tf.Tensor, CaseGeometry]:
    """Preprocess a whole image for prediction; also return how to map results back.

    Parameters
    ----------
    image : array-like
        ``(D, H, W)`` or ``(D, H, W, C)`` raw intensities.
    spacing : sequence of 3 floats
        Its voxel spacing, in array-axis order.
    plan : PreprocessPlan
    max_voxels : int, optional
        The largest resampled grid accepted
        (:func:`~medseg.pipeline.preprocess.check_resampling`).
    name : str, optional
        The file or case id, named in errors.

    Returns
    -------
    prepared : tf.Tensor
        ``(d, h, w, C)`` float32, as the model was trained on.
    geometry : CaseGeometry

    Raises
    ------
    ValueError
        The spacing is not 3 numbers, or the resampling to the plan's spacing is refused
        (an absurd grid, e.g. 40 mm voxels or a spacing in metres), before it is allocated.
    """
    if np.ndim(spacing) != 1 or len(spacing) != 3:
        where = f"{name}: " if name else ""
        raise ValueError(f"{where}spacing must be 3 numbers (one per axis), got {spacing!r}")
    image = tf.convert_to_tensor(image)
    spacing_tensor = tf.constant(spacing, tf.float64)
    prepared, _, (start, stop) = preprocess_with_box(
        image, None, spacing_tensor, plan, max_voxels=max_voxels, case_id=name
    )
    nearest_axis = -1
    if plan.target_spacing is not None:
        # back from the plan's spacing to the source's, under the same anisotropy rule
        nearest_axis = int(anisotropic_axis(plan.target_spacing, spacing, plan.anisotropy_threshold))
    geometry = CaseGeometry(
        source_shape=tuple(int(s) for s in image.shape[:3]),
        start=tuple(int(v) for v in start.numpy()),
        stop=tuple(int(v) for v in stop.numpy()),
        nearest_axis=nearest_axis,
    )
    return prepared, geometry


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
