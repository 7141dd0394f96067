"""Random patch sampling with foreground oversampling, as stateless TensorFlow graph ops.

A share of the patches is centred on a foreground voxel of a randomly chosen class
(nnU-Net's oversampling); the rest are placed uniformly. A case without foreground
falls back to uniform placement, and blank-patch skipping redraws a bounded number of
times, so sampling never loops and never fails. Slabs become 2D inputs
(:func:`slab_to_slice`) and whole cases are padded for full-image training
(:func:`pad_case`).
"""

from __future__ import annotations

import tensorflow as tf

# Foreground locations kept per class: enough to choose centres from, bounded in memory.
MAX_LOCATIONS_PER_CLASS = 10_000


def foreground_locations(label: tf.Tensor, num_classes: int, seed) -> tuple[tf.Tensor, tf.Tensor]:
    """Up to :data:`MAX_LOCATIONS_PER_CLASS` voxel indices of each foreground class.

    Parameters
    ----------
    label : tf.Tensor
        ``(D, H, W)`` integer label map.
    num_classes : int
        Number of classes including background 0.
    seed : tf.Tensor
        ``(2,)`` int32 stateless seed for the subsample.

    Returns
    -------
    coords : tf.Tensor
        ``(N, 3)`` int32 voxel indices.
    classes : tf.Tensor
        ``(N,)`` int32 class of each index.
    """
    coords, classes = [], []
    seeds = tf.random.experimental.stateless_split(seed, num=max(num_classes - 1, 1))
    for c in range(1, num_classes):
        where = tf.cast(tf.where(tf.equal(label, c)), tf.int32)
        where = tf.random.experimental.stateless_shuffle(where, seed=seeds[c - 1])
        where = where[:MAX_LOCATIONS_PER_CLASS]
        coords.append(where)
        classes.append(tf.fill([tf.shape(where)[0]], c))
    if not coords:
        return tf.zeros([0, 3], tf.int32), tf.zeros([0], tf.int32)
    return tf.concat(coords, axis=0), tf.concat(classes, axis=0)


def _random_int(seed, maxval) -> tf.Tensor:
    """A stateless integer in ``[0, maxval)``; ``maxval`` must be ≥ 1."""
    return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=maxval, dtype=tf.int32)


def patch_start(shape, patch_size, coords, classes, foreground_share: float, seed) -> tf.Tensor:
    """Choose the start corner of one patch.

    With probability ``foreground_share`` (and if the case has foreground) the patch is
    centred on a random location of a class chosen uniformly among the classes present;
    otherwise its start is uniform. Starts are clipped so the patch lies inside ``shape``.
    """
    shape = tf.cast(shape, tf.int32)
    patch = tf.constant(patch_size, tf.int32)
    high = shape - patch + 1  # exclusive bound of valid starts, ≥ 1 when the patch fits
    s_coin, s_class, s_loc, s_z, s_y, s_x = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=6)
    )
    uniform = tf.stack(
        [_random_int(s_z, high[0]), _random_int(s_y, high[1]), _random_int(s_x, high[2])]
    )

    def centred():
        present, _ = tf.unique(classes)
        chosen = present[_random_int(s_class, tf.size(present))]
        candidates = tf.boolean_mask(coords, tf.equal(classes, chosen))
        centre = candidates[_random_int(s_loc, tf.shape(candidates)[0])]
        return tf.clip_by_value(centre - patch // 2, 0, high - 1)

    use_foreground = tf.logical_and(
        tf.random.stateless_uniform([], seed=s_coin) < foreground_share,
        tf.size(classes) > 0,
    )
    return tf.cond(use_foreground, centred, lambda: uniform)


def crop(volume: tf.Tensor, start, patch_size) -> tf.Tensor:
    """The ``patch_size`` block of ``volume`` at ``start`` (extra trailing axes kept)."""
    start = tf.cast(start, tf.int32)
    rank = volume.shape.rank
    begin = tf.concat([start, tf.zeros([rank - 3], tf.int32)], axis=0)
    size = tf.constant(list(patch_size) + [-1] * (rank - 3), tf.int32)
    return tf.slice(volume, begin, size)


def foreground_fraction(label_patch: tf.Tensor) -> tf.Tensor:
    """Share of voxels of ``label_patch`` that are foreground (label > 0), as float32."""
    return tf.reduce_mean(tf.cast(label_patch > 0, tf.float32))


def choose_start(
    label,
    patch_size,
    coords,
    classes,
    foreground_share: float,
    seed,
    min_foreground: float = 0.0,
    max_redraws: int = 0,
) -> tf.Tensor:
    """Start corner of a patch, redrawn while it is blank (blank-patch skipping).

    The first draw is :func:`patch_start` with ``seed``. While its foreground fraction is
    below ``min_foreground``, at most ``max_redraws`` more are drawn (seeded by
    ``fold_in(seed, i)``) and the draw with the largest fraction is kept. The bound is what
    makes a case without foreground safe: it costs ``max_redraws`` extra label crops and
    returns a background patch (MIScnn's unbounded skip crashed there, its issue #81).
    """
    shape = tf.shape(label)
    first = patch_start(shape, patch_size, coords, classes, foreground_share, seed)
    if min_foreground <= 0 or max_redraws <= 0:
        return first

    def fraction(start):
        return foreground_fraction(crop(label, start, patch_size))

    def keep_drawing(i, _start, best):
        return tf.logical_and(i <= max_redraws, best < min_foreground)

    def redraw(i, best_start, best):
        draw_seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(i, tf.int64))
        start = patch_start(shape, patch_size, coords, classes, foreground_share, draw_seed)
        value = fraction(start)
        better = value > best
        return i + 1, tf.where(better, start, best_start), tf.maximum(value, best)

    _, start, _ = tf.while_loop(
        keep_drawing, redraw, (tf.constant(1), first, fraction(first)), parallel_iterations=1
    )
    return start


def sample_patch(
    image,
    label,
    coords,
    classes,
    patch_size,
    foreground_share,
    seed,
    min_foreground: float = 0.0,
    max_redraws: int = 0,
):
    """One ``(patch, label_patch)`` pair; see :func:`choose_start` for the placement.

    Only the patch is copied out of the volume (``tf.slice``), never the whole case.
    """
    start = choose_start(
        label, patch_size, coords, classes, foreground_share, seed, min_foreground, max_redraws
    )
    image_patch = crop(image, start, patch_size)
    label_patch = crop(label, start, patch_size)
    image_patch.set_shape(list(patch_size) + [image.shape[-1]])
    label_patch.set_shape(list(patch_size))
    return image_patch, label_patch


def slab_to_slice(image_patch: tf.Tensor, label_patch: tf.Tensor):
    """A ``(k, H, W, C)`` slab as a 2D input ``(H, W, k*C)`` and its centre slice's labels.

    Channels are ordered slice-major: channel ``z*C + c`` is channel ``c`` of slice ``z``
    (with ``k = 1`` this is just the slice). The label is slice ``k // 2`` of the slab.
    """
    k, h, w, c = image_patch.shape
    image = tf.reshape(tf.transpose(image_patch, [1, 2, 0, 3]), [h, w, k * c])
    return image, label_patch[k // 2]


def padded_shape(shape, min_shape, multiple: int) -> tf.Tensor:
    """``shape`` raised to at least ``min_shape``, then up to a multiple of ``multiple``."""
    shape = tf.maximum(tf.cast(shape, tf.int32), tf.constant(min_shape, tf.int32))
    return (shape + multiple - 1) // multiple * multiple


def pad_case(image: tf.Tensor, label: tf.Tensor, min_shape, multiple: int):
    """Pad a whole case at its far end to :func:`padded_shape` (image with 0, label background).

    0 is the mean intensity after z-scoring, so padding looks like neutral tissue.
    """
    target = padded_shape(tf.shape(label), min_shape, multiple)
    extra = target - tf.shape(label)
    pads = tf.stack([tf.zeros_like(extra), extra], axis=1)
    image = tf.pad(image, tf.concat([pads, [[0, 0]]], axis=0))
    return image, tf.pad(label, pads)
