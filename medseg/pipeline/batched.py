"""The built-in augmentation applied to a whole batch inside the compiled training step.

With ``augment.device="accelerator"`` the ``tf.data`` pipeline only reads, crops and
batches; :func:`augment_batch` then applies, per patch of the batch, the same transforms as
:func:`medseg.pipeline.augment.augment` in the same order (one resampling for rotation,
scaling and elastic deformation; rot90; flips; the intensity transforms), as batched ops
(``tf.where`` on per-sample coins, no per-sample branches) on the device that runs the step.

Every per-patch parameter comes from :func:`medseg.pipeline.augment.draw_parameters` with
the patch's seed (:func:`element_seeds`: the seed the ``tf.data`` path gives element
``step * batch + i``), so a seed gives the same transform on either path. The patch size
is the same as on the ``tf.data`` path: the warp clamps at the patch border
(``mode="nearest"``), exactly as :class:`~medseg.pipeline.augment.RandomSpatial` does.

Labels are one-hot ``(B, *spatial, K)`` (as batched by
:func:`~medseg.pipeline.dataset.training_dataset`) or integer ``(B, *spatial)``; they are
resampled nearest (whole one-hot rows are gathered), so they stay in their label set.
Augmentation is computed in float32 whatever the model's precision: resampling
coordinates in float16 would be off by up to 1/16 voxel at 128 voxels.
"""

from __future__ import annotations

import tensorflow as tf

from medseg.config import AugmentConfig
from medseg.pipeline.augment import (
    _INTENSITY,
    _box_muller_add,
    _radius,
    bias_field,
    check_augment_config,
    draw_parameters,
    gaussian_kernel,
    low_resolution_indices,
    rot90,
)
from medseg.pipeline.spatial import _grid, gather_linear, nearest_index, upsample_field

__all__ = [
    "AUGMENT_DEVICES",
    "BatchAugmentation",
    "augment_batch",
    "draw_batch_parameters",
    "element_seeds",
    "warp_batch",
]

# augment.device: "cpu" per patch in tf.data, "accelerator" per batch in the training step
AUGMENT_DEVICES = ("cpu", "accelerator")


def element_seeds(seed: int, step, batch_size: int) -> tf.Tensor:
    """``(batch_size, 2)`` int64 augmentation seeds of the patches of batch ``step``.

    Element ``e = step * batch_size + i`` of the training stream samples its patch from
    ``split((seed, e))[0]`` and is augmented with ``split((seed, e))[1]``
    (:func:`medseg.pipeline.dataset.training_dataset`).
    """
    first = tf.cast(step, tf.int64) * batch_size
    index = first + tf.range(batch_size, dtype=tf.int64)

    def one(e):
        pair = tf.stack([tf.constant(seed, tf.int64), e])
        return tf.random.experimental.stateless_split(pair, 2)[1]

    return tf.map_fn(one, index, fn_output_signature=tf.TensorSpec([2], tf.int64))


def draw_batch_parameters(config: AugmentConfig, seeds, shape, channels: int) -> dict:
    """:func:`~medseg.pipeline.augment.draw_parameters` of every patch, stacked on axis 0.

    Parameters
    ----------
    seeds : tf.Tensor
        ``(B, 2)`` integer seeds, one per patch.
    shape : sequence of int
        Static spatial patch shape.
    """
    shape = tuple(int(s) for s in shape)
    spec = {
        k: tf.TensorSpec(v.shape, v.dtype)
        for k, v in draw_parameters(config, tf.constant([0, 0], tf.int64), shape, channels).items()
    }
    return tf.map_fn(
        lambda s: draw_parameters(config, s, shape, channels),
        tf.cast(seeds, tf.int64),
        fn_output_signature=spec,
    )


def _per_sample(mask, rank: int):
    """``(B,)`` → ``(B, 1, ..., 1)`` of ``rank`` for broadcasting over a batch."""
    return tf.reshape(mask, [-1] + [1] * (rank - 1))


def warp_batch(images, labels, matrix, offset, displacement=None):
    """:func:`medseg.pipeline.spatial.warp` of every patch of a batch, in one gather.

    Parameters
    ----------
    images : tf.Tensor
        ``(B, *spatial, C)`` float32, static spatial shape.
    labels : tf.Tensor or None
        ``(B, *spatial)`` integer or ``(B, *spatial, K)`` one-hot; nearest.
    matrix, offset : tf.Tensor
        ``(B, n, n)`` and ``(B, n)``: output voxel → input voxel, per patch.
    displacement : tf.Tensor, optional
        ``(B, *grid, n)`` coarse displacement fields.
    """
    n = images.shape.rank - 2
    shape = [int(s) for s in images.shape[1:-1]]
    batch = tf.shape(images)[0]
    voxels = 1
    for s in shape:
        voxels *= s
    grid = _grid(shape)
    matrix = tf.cast(matrix, tf.float32)
    offset = tf.cast(offset, tf.float32)
    field = None
    if displacement is not None:
        field = tf.map_fn(
            lambda d: upsample_field(d, shape), tf.cast(displacement, tf.float32),
            fn_output_signature=tf.TensorSpec([n, *shape], tf.float32),
        )
    rank = n + 1

    def m(i, j):
        return _per_sample(matrix[:, i, j], rank)

    coords = []
    for i in range(n):
        c = _per_sample(offset[:, i], rank) + sum(m(i, j) * grid[j][None] for j in range(n))
        if field is not None:
            c = c + field[:, i]
        coords.append(c)
    strides = [1] * n
    for i in range(n - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    base = _per_sample(tf.range(batch) * voxels, rank)
    flat = tf.reshape(images, [-1, tf.shape(images)[-1]])
    out_images = tf.reshape(gather_linear(flat, coords, shape, strides, base), tf.shape(images))
    if labels is None:
        return out_images, None
    nearest = nearest_index(coords, shape, strides, base)
    one_hot = labels.shape.rank == images.shape.rank
    flat_labels = tf.reshape(labels, [-1, tf.shape(labels)[-1]] if one_hot else [-1])
    out_labels = tf.reshape(tf.gather(flat_labels, nearest), tf.shape(labels))
    return out_images, out_labels


def _select(mask, new, old):
    return tf.where(_per_sample(mask, old.shape.rank), new, old)


def _rot90_batch(x, turns, axes):
    # a non-square plane only ever turns by 180° (its draws say so too)
    square = x.shape[axes[0]] == x.shape[axes[1]]
    out = x
    for k in (1, 2, 3) if square else (2,):
        out = _select(tf.equal(turns, k), rot90(x, k, axes), out)
    return out


def _flip_batch(x, flips, ndim):
    for axis in range(ndim):
        x = _select(flips[:, axis], tf.reverse(x, [axis + 1]), x)
    return x


def _stats(x):
    """Per-patch, per-channel min, max, mean over the spatial axes, keepdims."""
    axes = list(range(1, x.shape.rank - 1))
    return (tf.reduce_min(x, axes, keepdims=True), tf.reduce_max(x, axes, keepdims=True),
            tf.reduce_mean(x, axes, keepdims=True), axes)  # fmt: skip


def _channelwise(value, rank):
    """``(B, C)`` → ``(B, 1, ..., 1, C)``."""
    return tf.reshape(value, [tf.shape(value)[0]] + [1] * (rank - 2) + [tf.shape(value)[-1]])


def _noise_batch(x, std, seeds):
    n = tf.size(x[0])

    def one(args):
        image, s, seed = args
        uniforms = tf.random.stateless_uniform(
            [2, (n + 1) // 2], seed=seed, minval=1e-7, maxval=1.0
        )
        return _box_muller_add(image, uniforms, s)

    return tf.map_fn(one, (x, std, seeds), fn_output_signature=tf.TensorSpec(x.shape[1:]))


def _blur_batch(x, sigma, radius):
    if radius < 1:
        return x
    kernels = tf.map_fn(
        lambda s: gaussian_kernel(s, radius), sigma,
        fn_output_signature=tf.TensorSpec([2 * radius + 1], tf.float32),
    )
    rank = x.shape.rank
    out = x
    for axis in range(1, rank - 1):
        pad = [[0, 0]] * rank
        pad[axis] = [radius, radius]
        padded = tf.pad(out, pad, mode="SYMMETRIC")
        size = out.shape[axis]
        acc = 0.0
        for t in range(2 * radius + 1):
            begin = [0] * rank
            begin[axis] = t
            extent = [-1] * rank
            extent[axis] = size
            acc += _per_sample(kernels[:, t], rank) * tf.slice(padded, begin, extent)
        out = acc
    return out


def _contrast_batch(x, factor):
    low, high, mean, _ = _stats(x)
    factor = _channelwise(factor, x.shape.rank)
    return tf.clip_by_value((x - mean) * factor + mean, low, high)


def _lowres_batch(x, zoom):
    out = x
    rank = x.shape.rank
    for axis in range(1, rank - 1):
        i0, i1, w = low_resolution_indices(x.shape[axis], zoom[:, None])
        shape = [-1] + [1] * (rank - 1)
        shape[axis] = x.shape[axis]
        a = tf.gather(out, i0, axis=axis, batch_dims=1)
        b = tf.gather(out, i1, axis=axis, batch_dims=1)
        out = a + (b - a) * tf.reshape(w, shape)
    return out


def _gamma_batch(x, gamma):
    low, high, mean, axes = _stats(x)
    span = high - low + 1e-7
    out = tf.pow((x - low) / span, _channelwise(gamma, x.shape.rank)) * span + low
    std = tf.math.reduce_std(x, axes, keepdims=True)
    new_mean = tf.reduce_mean(out, axes, keepdims=True)
    new_std = tf.math.reduce_std(out, axes, keepdims=True)
    return (out - new_mean) * (std / (new_std + 1e-8)) + mean


def _bias_batch(x, coefficients, magnitude, pedestal):
    shape = [int(s) for s in x.shape[1:-1]]
    fields = tf.map_fn(
        lambda a: bias_field(shape, a[0], a[1]), (coefficients, magnitude),
        fn_output_signature=tf.TensorSpec(shape, tf.float32),
    )
    axes = list(range(1, x.shape.rank - 1))
    low = tf.reduce_min(x, axes, keepdims=True)
    high = tf.reduce_max(x, axes, keepdims=True)
    pedestal = tf.reshape(tf.cast(pedestal, x.dtype), [-1] + [1] * (x.shape.rank - 1))
    pivot = low - pedestal * (high - low)
    return (x - pivot) * fields[..., None] + pivot


def augment_batch(images, labels, config: AugmentConfig, seeds):
    """Augment every patch of a batch as :func:`~medseg.pipeline.augment.augment` would.

    Parameters
    ----------
    images : tf.Tensor
        ``(B, *spatial, C)`` with a static spatial shape and channel count (2 or 3
        spatial axes); computed in float32 and returned in the input's dtype.
    labels : tf.Tensor or None
        ``(B, *spatial)`` integer or ``(B, *spatial, K)`` one-hot label maps.
    config : AugmentConfig
        The same section the ``tf.data`` path uses (``device`` is not read here).
    seeds : tf.Tensor
        ``(B, 2)`` per-patch seeds (:func:`element_seeds`).

    Returns
    -------
    images, labels : tf.Tensor
        Same shapes and dtypes as the inputs.
    """
    check_augment_config(config)
    dtype = images.dtype
    images = tf.cast(images, tf.float32)
    if not config.enabled:
        return tf.cast(images, dtype), labels
    ndim = images.shape.rank - 2 if images.shape.rank is not None else -1
    shape = images.shape[1:]
    if ndim not in (2, 3) or not shape.is_fully_defined():
        raise ValueError(
            f"augment_batch: images must be (B, *spatial, C) with 2 or 3 spatial axes of "
            f"static size, got shape {images.shape}: batch with drop_remainder and a fixed "
            "patch.patch_size, or use augment.device='cpu'"
        )
    spatial = [int(s) for s in shape[:-1]]
    p = draw_batch_parameters(config, seeds, spatial, int(shape[-1]))

    # 1. rotation, scaling, elastic: one resampling (identity where no coin fell)
    if max(config.rotation_probability, config.scale_probability,
           config.elastic_probability) > 0:  # fmt: skip
        warped = lambda: warp_batch(  # noqa: E731
            images, labels, p["matrix"], p["offset"], p.get("displacement")
        )
        if labels is None:
            images = tf.cond(tf.reduce_any(p["spatial"]), lambda: warped()[0], lambda: images)
        else:
            new_images, new_labels = tf.cond(
                tf.reduce_any(p["spatial"]), warped, lambda: (images, labels)
            )
            images = _select(p["spatial"], new_images, images)
            labels = _select(p["spatial"], new_labels, labels)
    # 2. rot90 in the plane of the last two spatial axes, 3. mirroring
    if config.rot90_probability > 0:
        axes = (ndim - 1, ndim)  # of the batched tensor: the patch's last two spatial axes
        images = _rot90_batch(images, p["rot90"], axes)
        if labels is not None:
            labels = _rot90_batch(labels, p["rot90"], axes)
    if config.flip_probability > 0:
        images = _flip_batch(images, p["flip"], ndim)
        if labels is not None:
            labels = _flip_batch(labels, p["flip"], ndim)
    # 4. intensity, in augment's order; the label passes through
    rank = images.shape.rank
    ops = {
        "noise": lambda x: _noise_batch(x, p["noise_value"], p["noise_seed"]),
        "blur": lambda x: _blur_batch(x, p["blur_value"], _radius(config.blur_sigma[1])),
        "brightness": lambda x: x * _channelwise(p["brightness_value"], rank),
        "contrast": lambda x: _contrast_batch(x, p["contrast_value"]),
        "lowres": lambda x: _lowres_batch(x, p["lowres_value"]),
        "gamma_inverted": lambda x: -_gamma_batch(-x, p["gamma_inverted_value"]),
        "gamma": lambda x: _gamma_batch(x, p["gamma_value"]),
        "bias_field": lambda x: _bias_batch(
            x, p["bias_field_value"], p["bias_field_magnitude"], p["bias_field_pedestal"]
        ),
    }
    for name, (_, probability_key, _) in _INTENSITY.items():
        if getattr(config, probability_key) > 0:
            images = _select(p[name], ops[name](images), images)
    return tf.cast(images, dtype), labels


class BatchAugmentation:
    """``(images, labels, step, first) -> (images, labels)``: :func:`augment_batch` of
    global batch ``step`` of the training stream, for the replica holding its patches
    ``first``, ``first + 1``, ... (the training loop calls it inside the compiled step).

    Parameters
    ----------
    config : AugmentConfig
        ``augment.*``; checked here, naming the key, before any step is traced.
    seed : int
        The training stream's seed (``Config.seed``).
    batch_size : int
        The global batch size (``patch.batch_size``).
    """

    def __init__(self, config: AugmentConfig, seed: int, batch_size: int):
        check_augment_config(config)
        self.config, self.seed, self.batch_size = config, int(seed), int(batch_size)

    def __call__(self, images, labels, step, first=0):
        seeds = element_seeds(self.seed, step, self.batch_size)
        seeds = tf.slice(seeds, [tf.cast(first, tf.int32), 0], [tf.shape(images)[0], 2])
        return augment_batch(images, labels, self.config, seeds)

    def __repr__(self) -> str:
        return f"BatchAugmentation(augment.*, seed={self.seed}, batch={self.batch_size})"
