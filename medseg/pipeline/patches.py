"""Random patch sampling with foreground oversampling, as stateless TensorFlow graph ops.

A share of the patches is centred on a foreground voxel of a randomly chosen class
(nnU-Net's oversampling); the rest are placed uniformly. A case without foreground
falls back to uniform placement, so sampling never loops and never fails.
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


def sample_patch(image, label, coords, classes, patch_size, foreground_share, seed):
    """One ``(patch, label_patch)`` pair; see :func:`patch_start` for the placement."""
    start = patch_start(tf.shape(label), patch_size, coords, classes, foreground_share, seed)
    image_patch = crop(image, start, patch_size)
    label_patch = crop(label, start, patch_size)
    image_patch.set_shape(list(patch_size) + [image.shape[-1]])
    label_patch.set_shape(list(patch_size))
    return image_patch, label_patch
