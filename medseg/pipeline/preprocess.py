"""Per-case preprocessing as TensorFlow graph ops: cropping, clipping, normalization,
resampling, padding.

Every function takes and returns tensors and works inside ``tf.data.Dataset.map``.
Images are channels-last ``(*spatial, C)`` with 2 or 3 spatial axes (``(D, H, W, C)`` for
volumes); label maps are ``(*spatial)``.

The order of :func:`preprocess_case` is nnU-Net's: crop to the non-zero region (raw
intensities), clip and normalize, resample to the target spacing, pad to a minimum shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from medseg.config import PreprocessConfig
from medseg.datasets.fingerprint import Fingerprint
from medseg.pipeline.spatial import resize, resize_axis

NORMALIZATIONS = ("fingerprint", "image", "minmax", "ct", "none")

Number = float | tuple[float, ...]  # one value, or one per channel


@dataclass(frozen=True)
class PreprocessPlan:
    """The resolved numbers of a preprocessing config: what is applied to every case.

    It is the "plan" of nnU-Net's phases (fingerprint → plan → preprocess): computed once
    from the config and the dataset fingerprint, logged with the run and reused for
    prediction. ``clip`` bounds, ``mean`` and ``std`` are one number or one per channel.
    """

    target_spacing: tuple[float, ...] | None
    clip: tuple[Number, Number] | None
    mean: Number | None  # None with normalize="zscore": z-score per image
    std: Number | None
    normalize: str = "zscore"  # "zscore" | "minmax" | "none"
    crop_to_nonzero: bool = False
    crop_threshold: float | None = None
    anisotropy_threshold: float = 3.0
    # the user's own steps ("module:attribute"), applied last: preprocess.extra
    extra: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if not self.extra:  # plans (and cache keys) without user steps stay as they were
            values.pop("extra")
        else:
            values["extra"] = list(self.extra)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessPlan:
        """Inverse of :meth:`to_dict` (lists become tuples); later fields are optional."""

        def num(v):
            if v is None:
                return None
            return tuple(float(x) for x in v) if isinstance(v, list | tuple) else float(v)

        def tup(v):
            return None if v is None else tuple(num(x) for x in v)

        extra = {
            k: values[k]
            for k in ("normalize", "crop_to_nonzero", "crop_threshold", "anisotropy_threshold")
            if k in values
        }
        if values.get("extra"):
            extra["extra"] = tuple(str(v) for v in values["extra"])
        return cls(
            target_spacing=tup(values["target_spacing"]),
            clip=tup(values["clip"]),
            mean=num(values["mean"]),
            std=num(values["std"]),
            **extra,
        )


def _channel_stats(fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    return Fingerprint.of(fingerprint).intensity_channels


def _per_channel(values: list) -> Number:
    values = [float(v) for v in values]
    return values[0] if len(values) == 1 else tuple(values)


def plan_preprocessing(config: PreprocessConfig, fingerprint: dict[str, Any]) -> PreprocessPlan:
    """Resolve ``config`` against a dataset ``fingerprint`` into a :class:`PreprocessPlan`.

    Multi-channel fingerprints (``foreground_intensity_per_channel``) give per-channel
    clip bounds, means and standard deviations.

    Raises
    ------
    ValueError
        If the config asks for fingerprint statistics the fingerprint does not have
        (e.g. a dataset without any foreground voxel), or names an unknown mode.
    """
    channels = _channel_stats(fingerprint)

    def fingerprint_values(*keys, why):
        missing = [k for k in keys for c in channels if c.get(k) is None]
        if missing:
            raise ValueError(
                f"{why} needs the foreground intensity {', '.join(sorted(set(missing)))}, "
                "but the dataset fingerprint has none (no foreground voxels?)"
            )
        return [_per_channel([c[k] for c in channels]) for k in keys]

    if config.normalize not in NORMALIZATIONS:
        raise ValueError(
            f"preprocess.normalize={config.normalize!r}: use one of {', '.join(NORMALIZATIONS)}"
        )
    if config.normalize == "ct" and config.clip != "fingerprint":
        raise ValueError(
            f"preprocess.normalize='ct' clips to the fingerprint's percentiles, but "
            f"preprocess.clip={config.clip!r}: set clip='fingerprint', or use "
            "normalize='fingerprint' with fixed bounds"
        )
    if isinstance(config.clip, str):
        if config.clip == "none":
            clip = None
        elif config.clip == "fingerprint":
            clip = tuple(
                fingerprint_values(
                    "percentile_00_5", "percentile_99_5", why="preprocess.clip='fingerprint'"
                )
            )
        else:
            raise ValueError(
                f"preprocess.clip={config.clip!r}: use 'fingerprint', 'none' or two numbers"
            )
    else:
        clip = (float(config.clip[0]), float(config.clip[1]))
        if clip[0] >= clip[1]:
            raise ValueError(f"preprocess.clip={list(clip)}: lower bound must be below upper")

    mean = std = None
    scheme = "zscore"
    if config.normalize in ("fingerprint", "ct"):
        why = f"preprocess.normalize={config.normalize!r}"
        mean, std = fingerprint_values("mean", "std", why=why)
        if min(np.atleast_1d(std)) <= 0:
            raise ValueError(f"{why}: the fingerprint's foreground std is {std}, not positive")
        if config.normalize == "fingerprint" and clip is not None:
            # statistics of the clipped foreground; the fingerprint's are of the unclipped
            # values, which differ little inside 0.5-99.5 % (nnU-Net's "ct" uses them as is)
            mean = _per_channel(np.clip(mean, clip[0], clip[1]).reshape(-1).tolist())
    elif config.normalize in ("minmax", "none"):
        scheme = config.normalize

    target = None
    if config.target_spacing is not None:
        target = tuple(float(s) for s in config.target_spacing)
        if min(target) <= 0:
            raise ValueError(f"preprocess.target_spacing={list(target)} must be positive")
    if config.anisotropy_threshold <= 1:
        raise ValueError(
            f"preprocess.anisotropy_threshold={config.anisotropy_threshold} must be above 1"
        )
    return PreprocessPlan(
        target_spacing=target,
        clip=clip,
        mean=mean,
        std=std,
        normalize=scheme,
        crop_to_nonzero=bool(config.crop_to_nonzero),
        crop_threshold=None if config.crop_threshold is None else float(config.crop_threshold),
        anisotropy_threshold=float(config.anisotropy_threshold),
        extra=tuple(config.extra),
    )


# -- resampling ----------------------------------------------------------------------------


def resampled_shape(shape, spacing, target_spacing) -> tf.Tensor:
    """Shape of a volume of ``shape`` at ``spacing`` after resampling to ``target_spacing``.

    ``round(shape * spacing / target_spacing)``, at least 1 per axis (nnU-Net's rule).
    """
    shape = tf.cast(shape, tf.float64)
    ratio = tf.cast(spacing, tf.float64) / tf.constant(target_spacing, tf.float64)
    return tf.maximum(tf.cast(tf.round(shape * ratio), tf.int32), 1)


# The largest resampled grid accepted, in voxels per channel: 2**30 is 4 GiB of float32
# per channel and per copy (resampling holds about three copies; prediction adds K + 1
# floats per voxel). The largest real scans stay far below it (a 512 x 512 x 2000
# whole-body CT is 5 * 10**8 voxels), while a spacing in the wrong unit (cm read as mm:
# 10x per axis, 1000x voxels) goes far above it: the bound catches headers, not patients.
MAX_RESAMPLED_VOXELS = 2**30


def check_resampling(
    shape,
    spacing,
    target_spacing,
    max_voxels: int = MAX_RESAMPLED_VOXELS,
    case_id=None,
) -> tf.Operation | None:
    """Refuse a resampling whose grid is absurd, before it is allocated.

    Refused: a spacing that is not positive and finite; an axis of more than one voxel
    that :func:`resampled_shape` would collapse to none (it would clamp it to one voxel,
    e.g. a spacing in metres read as millimetres); a resampled grid of more than
    ``max_voxels`` voxels (e.g. 40 mm voxels resampled to 1 mm).

    Parameters
    ----------
    shape : sequence of int or int tensor
        Spatial shape before resampling (after any crop).
    spacing : sequence of float or float tensor
        Its voxel spacing.
    target_spacing : sequence of float
        The plan's target spacing.
    max_voxels : int, optional
        The largest resampled grid accepted (:data:`MAX_RESAMPLED_VOXELS` by default).
    case_id : str or string tensor, optional
        The file or case, named in the message.

    Returns
    -------
    tf.Operation or None
        Eagerly, None (the check has run). In a graph (``tf.data.Dataset.map``), the
        assertion, to run before the resampling (``tf.control_dependencies``); it raises
        ``tf.errors.InvalidArgumentError`` with the same figures.

    Raises
    ------
    ValueError
        Eagerly: naming the case, the source shape and spacing, the target spacing, the
        resulting shape and voxel count, and what to check.
    """
    if max_voxels < 1:
        raise ValueError(f"max_voxels={max_voxels} must be at least 1")
    # float64 throughout: a grid of 10**12 voxels must not wrap around in int32 first
    source = tf.cast(shape, tf.float64)
    spacing = tf.cast(spacing, tf.float64)
    target = tf.constant(target_spacing, tf.float64)
    sizes = tf.round(source * spacing / target)  # resampled_shape before its clamp to 1
    voxels = tf.reduce_prod(tf.maximum(sizes, 1.0))
    spacing_ok = tf.reduce_all(tf.math.is_finite(spacing) & (spacing > 0))
    collapsed = (sizes < 1) & (source > 1)
    ok = spacing_ok & ~tf.reduce_any(collapsed) & (voxels <= max_voxels)
    if not tf.executing_eagerly():
        return tf.debugging.Assert(
            ok,
            [
                "preprocessing case", "" if case_id is None else case_id,
                ": resampling from shape", tf.cast(shape, tf.int64),
                "at spacing", spacing, "to the target spacing", target, "gives shape",
                sizes, "=", voxels, "voxels; refused: a spacing must be positive and "
                "finite, an axis of more than one voxel must not collapse to none, and at "
                f"most {max_voxels} voxels are resampled (max_voxels). Check the case's "
                "voxel spacing (its header's units) or preprocess.target_spacing",
            ],
            summarize=8,
        )
    if bool(ok):
        return None
    raise ValueError(
        _resampling_message(
            source.numpy(), spacing.numpy(), target.numpy(), sizes.numpy(), float(voxels),
            max_voxels, case_id,
        )
    )


def _resampling_message(source, spacing, target, sizes, voxels, max_voxels, case_id) -> str:
    if tf.is_tensor(case_id):
        case_id = case_id.numpy()
    if isinstance(case_id, bytes):
        case_id = case_id.decode(errors="replace")
    where = f"{case_id}: " if case_id is not None else ""
    shape = tuple(int(v) for v in source)
    spacings, targets = (tuple(float(f"{v:.6g}") for v in s) for s in (spacing, target))
    head = (
        f"{where}resampling from shape {shape} at spacing {spacings} mm to the target "
        f"spacing {targets} mm"
    )
    if not all(np.isfinite(spacing) & (spacing > 0)):
        return (
            f"{head}: the spacing must be positive and finite; check the file's header "
            "(pixdim / PixelSpacing, SliceThickness)"
        )
    result = tuple(int(v) for v in sizes)
    collapsed = [a for a in range(len(sizes)) if sizes[a] < 1 and source[a] > 1]
    if collapsed:
        axes = ", ".join(f"axis {a} ({int(source[a])} voxels)" for a in collapsed)
        return (
            f"{head} would collapse {axes} to less than one voxel (shape {result}); check "
            "the file's voxel spacing (a spacing in metres or cm instead of mm?) or the "
            "plan's target spacing"
        )
    return (
        f"{head} gives shape {result} = {voxels:,.0f} voxels, above the bound of "
        f"{max_voxels:,} (max_voxels); check the file's voxel spacing (a spacing in cm "
        "instead of mm?) or, for a truly larger scan, raise max_voxels"
    )


def anisotropic_axis(spacing, target_spacing, threshold: float = 3.0) -> tf.Tensor:
    """The axis resampled without interpolation under nnU-Net's anisotropy rule, or -1.

    If ``max(spacing) / min(spacing) > threshold`` for the current spacing (else for the
    target spacing), the axis of largest spacing, provided exactly one axis has it.
    """
    spacing = tf.cast(spacing, tf.float64)
    target = tf.constant(target_spacing, tf.float64)

    def coarse(s):
        is_max = tf.equal(s, tf.reduce_max(s))
        single = tf.equal(tf.reduce_sum(tf.cast(is_max, tf.int32)), 1)
        axis = tf.cast(tf.argmax(tf.cast(is_max, tf.int32)), tf.int32)
        return tf.where(single, axis, -1)

    def anisotropic(s):
        return tf.reduce_max(s) / tf.reduce_min(s) > threshold

    return tf.where(
        anisotropic(spacing), coarse(spacing), tf.where(anisotropic(target), coarse(target), -1)
    )


def resample(volume: tf.Tensor, new_shape, method: str = "linear", nearest_axis=None):
    """Resample a ``(*spatial, C)`` volume to spatial shape ``new_shape``.

    Separable: one 1D interpolation per axis, each two ``tf.gather`` along that axis.
    Sample positions follow the half-pixel-centre convention: output index ``o`` reads
    input coordinate ``(o + 0.5) * in / out - 0.5``, clamped at the edges
    (``scipy.ndimage.map_coordinates`` with ``mode="nearest"`` is the reference).

    Parameters
    ----------
    volume : tf.Tensor
        ``(*spatial, C)`` float volume, 2 or 3 spatial axes.
    new_shape : sequence of ints or int tensor
        Output spatial shape.
    method : {"linear", "nearest"}
        "nearest" for label maps (or use :func:`resample_labels`).
    nearest_axis : int or scalar int tensor, optional
        With "linear", an axis resampled by nearest neighbour instead (-1: none); see
        :func:`anisotropic_axis`.
    """
    if method not in ("linear", "nearest"):
        raise ValueError(f"unknown resampling method {method!r}; use 'linear' or 'nearest'")
    ndim = volume.shape.rank - 1
    if method == "nearest":
        return resize(volume, new_shape, nearest=True)
    if nearest_axis is None:
        return resize(volume, new_shape, nearest=False)
    nearest = tf.equal(tf.range(ndim), tf.cast(nearest_axis, tf.int32))
    return resize(volume, new_shape, nearest=nearest)


def resample_labels(label: tf.Tensor, new_shape) -> tf.Tensor:
    """Nearest-neighbour resampling of a ``(*spatial)`` integer label map (dtype kept)."""
    new_shape = tf.cast(new_shape, tf.int32)
    out = label
    for axis in range(label.shape.rank):
        out = resize_axis(out, axis, new_shape[axis], nearest=True)
    return out


# -- intensities ---------------------------------------------------------------------------


def _spatial_axes(image) -> list[int]:
    return list(range(image.shape.rank - 1))


def normalize(image: tf.Tensor, plan: PreprocessPlan) -> tf.Tensor:
    """Clip and normalize a ``(*spatial, C)`` image as ``plan`` says, per channel.

    ``zscore``: ``(x - mean) / std`` with the plan's statistics, or the image's own (per
    channel) if the plan has none; ``minmax``: ``(x - min) / (max - min)`` per image and
    channel; ``none``: clipping only.
    """
    image = tf.cast(image, tf.float32)
    if plan.clip is not None:
        image = tf.clip_by_value(
            image, tf.constant(plan.clip[0], tf.float32), tf.constant(plan.clip[1], tf.float32)
        )
    axes = _spatial_axes(image)
    if plan.normalize == "none":
        return image
    if plan.normalize == "minmax":
        low, high = tf.reduce_min(image, axes), tf.reduce_max(image, axes)
        return (image - low) / tf.maximum(high - low, 1e-8)
    if plan.normalize != "zscore":
        raise ValueError(f"plan.normalize={plan.normalize!r}: use 'zscore', 'minmax' or 'none'")
    if plan.mean is not None:
        std = np.maximum(np.asarray(plan.std, np.float32), 1e-8)
        return (image - tf.constant(plan.mean, tf.float32)) / tf.constant(std)
    mean = tf.reduce_mean(image, axes)
    std = tf.math.reduce_std(image, axes)
    return (image - mean) / tf.maximum(std, 1e-8)


# -- cropping, padding, one-hot ------------------------------------------------------------


def nonzero_box(image: tf.Tensor, threshold: float | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Bounding box ``(start, stop)`` of the voxels where any channel is non-zero.

    With ``threshold``, of the voxels where any channel is above it (a body mask for CT,
    whose background is negative). An image without such voxels gives the whole image.

    Parameters
    ----------
    image : tf.Tensor
        ``(*spatial, C)``.

    Returns
    -------
    start, stop : tf.Tensor
        ``(ndim,)`` int32, ``stop`` exclusive.
    """
    inside = tf.not_equal(image, 0) if threshold is None else image > threshold
    mask = tf.reduce_any(inside, axis=-1)
    ndim = mask.shape.rank
    starts, stops = [], []
    for axis in range(ndim):
        line = tf.reduce_any(mask, axis=[a for a in range(ndim) if a != axis])
        where = tf.cast(tf.where(line)[:, 0], tf.int32)
        size = tf.shape(mask)[axis]
        empty = tf.equal(tf.size(where), 0)
        starts.append(tf.where(empty, 0, tf.reduce_min(tf.concat([where, [size]], 0))))
        stops.append(tf.where(empty, size, tf.reduce_max(tf.concat([where, [-1]], 0)) + 1))
    return tf.stack(starts), tf.stack(stops)


def crop_to_box(x: tf.Tensor, start, stop) -> tf.Tensor:
    """``x[start[0]:stop[0], ..., start[n-1]:stop[n-1]]``; trailing axes kept whole."""
    start = tf.cast(start, tf.int32)
    extra = x.shape.rank - start.shape[0]
    begin = tf.concat([start, tf.zeros([extra], tf.int32)], 0)
    size = tf.concat([tf.cast(stop, tf.int32) - start, -tf.ones([extra], tf.int32)], 0)
    return tf.slice(x, begin, size)


def pad_to_shape(x: tf.Tensor, min_shape, value=0) -> tf.Tensor:
    """Pad the leading ``len(min_shape)`` axes of ``x`` with ``value`` to at least ``min_shape``.

    The padding is split evenly (the extra voxel after), as nnU-Net's; axes already as
    large are left alone.
    """
    min_shape = tf.cast(min_shape, tf.int32)
    n = min_shape.shape[0]
    missing = tf.maximum(min_shape - tf.shape(x)[:n], 0)
    before = missing // 2
    pads = tf.stack([before, missing - before], axis=1)
    pads = tf.concat([pads, tf.zeros([x.shape.rank - n, 2], tf.int32)], 0)
    return tf.pad(x, pads, constant_values=tf.cast(value, x.dtype))


def one_hot(label: tf.Tensor, num_classes: int) -> tf.Tensor:
    """``(*spatial)`` integer labels → ``(*spatial, num_classes)`` float32 one-hot."""
    return tf.one_hot(tf.cast(label, tf.int32), num_classes, dtype=tf.float32)


# -- one case ------------------------------------------------------------------------------


def preprocess_case(
    image,
    label,
    spacing,
    plan: PreprocessPlan,
    min_shape=None,
    *,
    max_voxels: int = MAX_RESAMPLED_VOXELS,
    case_id=None,
):
    """Crop, clip, normalize, resample and pad one case.

    Parameters
    ----------
    image : tf.Tensor
        ``(*spatial)`` or ``(*spatial, C)`` intensities; the spatial rank is the length of
        ``spacing`` (3 unless given statically otherwise).
    label : tf.Tensor or None
        ``(*spatial)`` label map, or None for an unlabelled image.
    spacing : tf.Tensor
        ``(ndim,)`` voxel spacing in array-axis order.
    plan : PreprocessPlan
    min_shape : sequence of ints, optional
        Pad (image with 0, label with 0) to at least this spatial shape, e.g. the patch size.
    max_voxels : int, optional
        The largest resampled grid accepted, see :func:`check_resampling`.
    case_id : str or string tensor, optional
        Named in the resampling check's message.

    Returns
    -------
    image : tf.Tensor
        ``(*spatial', C)`` float32.
    label : tf.Tensor or None
        ``(*spatial')`` int32.

    Raises
    ------
    ValueError
        Eagerly, for a resampling :func:`check_resampling` refuses (in a graph:
        ``tf.errors.InvalidArgumentError`` when it runs), before the resampled grid is
        allocated.

    See Also
    --------
    medseg.pipeline.geometry.prepare_case : the same for prediction, with the way back.
    """
    image, label, _ = preprocess_with_box(
        image, label, spacing, plan, min_shape, max_voxels=max_voxels, case_id=case_id
    )
    return image, label


def _user_step(spec: str, image, label):
    """Apply the user's preprocessing step ``spec`` (``(image, label) -> (image, label)``,
    label None for prediction), naming it when it fails."""
    from medseg.pipeline.transforms import TransformError, load_transform

    step = load_transform(spec, "preprocess.extra")
    try:
        out_image, out_label = step(image, label)
        out_image = tf.cast(tf.convert_to_tensor(out_image), tf.float32)
    except Exception as err:
        raise TransformError(
            f"preprocess.extra step {spec} failed on an image of shape {image.shape}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if out_image.shape.rank != image.shape.rank:
        raise TransformError(
            f"preprocess.extra step {spec} returned an image of rank {out_image.shape.rank} "
            f"for one of rank {image.shape.rank}"
        )
    return out_image, None if label is None else tf.cast(out_label, tf.int32)


def preprocess_with_box(
    image,
    label,
    spacing,
    plan: PreprocessPlan,
    min_shape=None,
    *,
    max_voxels: int = MAX_RESAMPLED_VOXELS,
    case_id=None,
):
    """:func:`preprocess_case`, also returning the crop box ``(start, stop)`` in the input
    grid (the whole image when the plan does not crop)."""
    spacing = tf.convert_to_tensor(spacing)
    ndim = spacing.shape[0] if spacing.shape.rank == 1 and spacing.shape[0] else 3
    image = tf.cast(image, tf.float32)
    if image.shape.rank == ndim:
        image = image[..., None]
    if label is not None:
        label = tf.cast(label, tf.int32)
    if plan.crop_to_nonzero:
        start, stop = nonzero_box(image, plan.crop_threshold)
        image = crop_to_box(image, start, stop)
        if label is not None:
            label = crop_to_box(label, start, stop)
    else:
        start, stop = tf.zeros([ndim], tf.int32), tf.shape(image)[:ndim]
    checked = []
    if plan.target_spacing is not None:
        if len(plan.target_spacing) != ndim:
            raise ValueError(
                f"plan.target_spacing={list(plan.target_spacing)} has {len(plan.target_spacing)}"
                f" axes, the image {ndim}"
            )
        # before normalizing and resampling: a refused case allocates nothing more
        check = check_resampling(
            tf.shape(image)[:ndim], spacing, plan.target_spacing, max_voxels, case_id
        )
        checked = [] if check is None else [check]
    with tf.control_dependencies(checked):  # in a graph, the check runs first
        image = tf.identity(image) if checked else image
    image = normalize(image, plan)
    if plan.target_spacing is not None:
        new_shape = resampled_shape(tf.shape(image)[:ndim], spacing, plan.target_spacing)
        axis = anisotropic_axis(spacing, plan.target_spacing, plan.anisotropy_threshold)
        image = resample(image, new_shape, "linear", nearest_axis=axis)
        if label is not None:
            label = resample_labels(label, new_shape)
    for spec in plan.extra:
        image, label = _user_step(spec, image, label)
    if min_shape is not None:
        image = pad_to_shape(image, min_shape)
        if label is not None:
            label = pad_to_shape(label, min_shape)
    return image, label, (start, stop)
