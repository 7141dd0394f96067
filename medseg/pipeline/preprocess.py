"""Per-case preprocessing as TensorFlow graph ops: resampling, clipping, normalization.

Every function takes and returns tensors and works inside ``tf.data.Dataset.map``.
Volumes are channels-last: ``(D, H, W, C)``; label maps are ``(D, H, W)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from medseg.config import PreprocessConfig


@dataclass(frozen=True)
class PreprocessPlan:
    """The resolved numbers of a preprocessing config: what is applied to every case.

    It is the "plan" of nnU-Net's phases (fingerprint → plan → preprocess): computed once
    from the config and the dataset fingerprint, logged with the run and reused for
    prediction.
    """

    target_spacing: tuple[float, float, float] | None
    clip: tuple[float, float] | None
    mean: float | None  # None: z-score per image
    std: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessPlan:
        def tup(v):
            return None if v is None else tuple(float(x) for x in v)

        return cls(
            target_spacing=tup(values["target_spacing"]),
            clip=tup(values["clip"]),
            mean=values["mean"],
            std=values["std"],
        )


def plan_preprocessing(config: PreprocessConfig, fingerprint: dict[str, Any]) -> PreprocessPlan:
    """Resolve ``config`` against a dataset ``fingerprint`` into a :class:`PreprocessPlan`.

    Raises
    ------
    ValueError
        If the config asks for fingerprint statistics the fingerprint does not have
        (e.g. a dataset without any foreground voxel), or names an unknown mode.
    """
    intensity = fingerprint.get("foreground_intensity") or {}
    if isinstance(config.clip, str):
        if config.clip == "none":
            clip = None
        elif config.clip == "fingerprint":
            lo, hi = intensity.get("percentile_00_5"), intensity.get("percentile_99_5")
            if lo is None or hi is None:
                raise ValueError(
                    "preprocess.clip='fingerprint' needs foreground intensity percentiles, "
                    "but the dataset fingerprint has none (no foreground voxels?)"
                )
            clip = (float(lo), float(hi))
        else:
            raise ValueError(
                f"preprocess.clip={config.clip!r}: use 'fingerprint', 'none' or two numbers"
            )
    else:
        clip = (float(config.clip[0]), float(config.clip[1]))
        if clip[0] >= clip[1]:
            raise ValueError(f"preprocess.clip={list(clip)}: lower bound must be below upper")

    if config.normalize == "fingerprint":
        mean, std = intensity.get("mean"), intensity.get("std")
        if mean is None or not std:
            raise ValueError(
                "preprocess.normalize='fingerprint' needs the foreground mean and std, "
                "but the dataset fingerprint has none"
            )
        if clip is not None:
            # nnU-Net's CT scheme: statistics of the clipped foreground; the fingerprint's
            # are of the unclipped values, which differ little inside 0.5-99.5 %.
            mean = float(np.clip(mean, *clip))
        mean, std = float(mean), float(std)
    elif config.normalize == "image":
        mean = std = None
    else:
        raise ValueError(f"preprocess.normalize={config.normalize!r}: use 'fingerprint' or 'image'")

    target = None
    if config.target_spacing is not None:
        target = tuple(float(s) for s in config.target_spacing)
        if min(target) <= 0:
            raise ValueError(f"preprocess.target_spacing={list(target)} must be positive")
    return PreprocessPlan(target_spacing=target, clip=clip, mean=mean, std=std)


def resampled_shape(shape, spacing, target_spacing) -> tf.Tensor:
    """Shape of a volume of ``shape`` at ``spacing`` after resampling to ``target_spacing``.

    ``round(shape * spacing / target_spacing)``, at least 1 per axis (nnU-Net's rule).
    """
    shape = tf.cast(shape, tf.float64)
    ratio = tf.cast(spacing, tf.float64) / tf.constant(target_spacing, tf.float64)
    return tf.maximum(tf.cast(tf.round(shape * ratio), tf.int32), 1)


def resample(volume: tf.Tensor, new_shape, method: str = "linear") -> tf.Tensor:
    """Resample a ``(D, H, W, C)`` volume to spatial shape ``new_shape``.

    Separable: in-plane first (slices as the batch), then along the slice axis, which costs
    two 2D resizes instead of an 8-corner ``gather_nd``. Sample positions follow the
    half-pixel-centre convention: output index ``o`` reads input coordinate
    ``(o + 0.5) * in / out - 0.5``, clamped at the edges (``scipy.ndimage.map_coordinates``
    with ``mode="nearest"`` is the reference).

    Parameters
    ----------
    volume : tf.Tensor
        ``(D, H, W, C)`` float volume.
    new_shape : sequence of 3 ints or int tensor
        Output spatial shape.
    method : {"linear", "nearest"}
        "nearest" for label maps (cast them to float first, or use :func:`resample_labels`).
    """
    tf_method = {"linear": "bilinear", "nearest": "nearest"}.get(method)
    if tf_method is None:
        raise ValueError(f"unknown resampling method {method!r}; use 'linear' or 'nearest'")
    new_shape = tf.cast(new_shape, tf.int32)
    out = tf.image.resize(volume, new_shape[1:3], method=tf_method)  # (D, h, w, C)
    out = tf.transpose(out, [1, 0, 2, 3])  # (h, D, w, C)
    out = tf.image.resize(out, tf.stack([new_shape[0], new_shape[2]]), method=tf_method)
    return tf.transpose(out, [1, 0, 2, 3])


def resample_labels(label: tf.Tensor, new_shape) -> tf.Tensor:
    """Nearest-neighbour resampling of a ``(D, H, W)`` integer label map."""
    out = resample(tf.cast(label, tf.float32)[..., None], new_shape, method="nearest")
    return tf.cast(out[..., 0], label.dtype)


def normalize(image: tf.Tensor, plan: PreprocessPlan) -> tf.Tensor:
    """Clip and z-score ``image`` as ``plan`` says (per-image statistics if it has none)."""
    image = tf.cast(image, tf.float32)
    if plan.clip is not None:
        image = tf.clip_by_value(image, plan.clip[0], plan.clip[1])
    if plan.mean is not None:
        return (image - plan.mean) / max(plan.std, 1e-8)
    mean = tf.reduce_mean(image)
    std = tf.math.reduce_std(image)
    return (image - mean) / tf.maximum(std, 1e-8)


def preprocess_case(image, label, spacing, plan: PreprocessPlan):
    """Resample, clip and normalize one case.

    Parameters
    ----------
    image : tf.Tensor
        ``(D, H, W)`` or ``(D, H, W, C)`` intensities.
    label : tf.Tensor or None
        ``(D, H, W)`` label map, or None for an unlabelled image.
    spacing : tf.Tensor
        ``(3,)`` voxel spacing in array-axis order.

    Returns
    -------
    image : tf.Tensor
        ``(d, h, w, C)`` float32.
    label : tf.Tensor or None
        ``(d, h, w)`` int32.
    """
    image = tf.cast(image, tf.float32)
    if image.shape.rank == 3:
        image = image[..., None]
    image = normalize(image, plan)
    if label is not None:
        label = tf.cast(label, tf.int32)
    if plan.target_spacing is not None:
        new_shape = resampled_shape(tf.shape(image)[:3], spacing, plan.target_spacing)
        image = resample(image, new_shape, "linear")
        if label is not None:
            label = resample_labels(label, new_shape)
    return image, label
