"""Whole-case prediction: preprocess → sliding window → back to the source grid."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from medseg.inference.sliding_window import SlidingWindow
from medseg.pipeline.geometry import prepare_case
from medseg.pipeline.preprocess import MAX_RESAMPLED_VOXELS, PreprocessPlan

__all__ = ["predict_case", "predict_case_samples", "slabs"]


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
    window: SlidingWindow | None = None,
    max_voxels: int = MAX_RESAMPLED_VOXELS,
    name: str | None = None,
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
    window : SlidingWindow, optional
        A configured inferer (:meth:`SlidingWindow.from_plan`); replaces ``patch_size``'s
        window settings (``overlap``, ``batch_size``, ``weighting``, ``mirror_axes``,
        ``stride``). For a slab model it is the in-plane window.
    max_voxels : int, optional
        The largest preprocessed (resampled) grid accepted: a larger one is refused
        before it is allocated (:func:`~medseg.pipeline.preprocess.check_resampling`).
    name : str, optional
        The file or case id, named in errors.

    Returns
    -------
    labels : np.ndarray
        ``(D, H, W)`` uint8 argmax of the probabilities on the original grid.
    probabilities : np.ndarray or None
        ``(D, H, W, K)`` float32, resampled back from the preprocessed grid as the image
        was resampled to it (as nnU-Net does: interpolate probabilities, then take the
        argmax); outside the plan's crop box, background. None unless asked.
    """
    prepared, geometry = _prepare(image, spacing, plan, max_voxels, name)
    window = _window(
        window, patch_size, overlap, batch_size, weighting, mirror_axes, stride, slab
    )
    probs = _predict_prepared(prepared, model, num_classes, window, slab)
    return geometry.invert(probs, probabilities)


def predict_case_samples(
    sample_sets: Sequence[tuple[Callable | Sequence[Callable], SlidingWindow]],
    image: np.ndarray,
    spacing: Sequence[float],
    plan: PreprocessPlan,
    num_classes: int | None = None,
    *,
    slab: int | None = None,
    max_voxels: int = MAX_RESAMPLED_VOXELS,
    name: str | None = None,
) -> Iterator[np.ndarray]:
    """Several probability maps of one case on its original grid, one per sample.

    The case is preprocessed once; each ``(model, window)`` of ``sample_sets`` (see
    :func:`~medseg.inference.uncertainty.sample_sets`: a test-time flip, an ensemble
    member, a dropout pass) is then predicted as :func:`predict_case` would, one at a time.

    Yields
    ------
    np.ndarray
        ``(D, H, W, K)`` float32 probabilities on the original grid, in the order of
        ``sample_sets``.
    """
    prepared, geometry = _prepare(image, spacing, plan, max_voxels, name)
    for model, window in sample_sets:
        probs = _predict_prepared(prepared, model, num_classes, window, slab)
        yield geometry.invert(probs, True)[1]


def _prepare(image, spacing, plan, max_voxels, name):
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        where = f"{name}: " if name else ""
        raise ValueError(
            f"{where}image must be (D, H, W) or (D, H, W, C), got shape {image.shape}"
        )
    return prepare_case(image, spacing, plan, max_voxels=max_voxels, name=name)


def _window(window, patch_size, overlap, batch_size, weighting, mirror_axes, stride, slab):
    if slab is not None:
        if len(patch_size) != 3 or int(patch_size[0]) != slab:
            raise ValueError(
                f"slab={slab} needs the training patch size (k, H, W) with k = {slab}, got "
                f"{tuple(patch_size)}"
            )
    if window is None:
        window = SlidingWindow(
            tuple(int(p) for p in patch_size),
            overlap,
            batch_size,
            weighting,
            tuple(mirror_axes),
            stride if stride is None or np.isscalar(stride) else tuple(int(s) for s in stride),
        )
        if slab is not None:
            window = window.in_plane()
    return window


def _predict_prepared(prepared, model, num_classes, window, slab):
    if slab is None:
        return window(prepared, model, num_classes)
    return tf.stack([window(x, model, num_classes) for x in slabs(prepared, slab)])


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
