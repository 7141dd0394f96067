"""Patch sampling: placement, foreground share, blank-patch skipping, cases without
foreground, 2D slabs and full-image padding, against numpy brute force."""

import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

from medseg.pipeline.patches import (
    choose_start,
    crop,
    foreground_fraction,
    foreground_locations,
    pad_case,
    padded_shape,
    patch_start,
    sample_patch,
    slab_to_slice,
)


def _case(shape=(12, 20, 24), fg_box=None):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(*shape, 1)).astype(np.float32)
    label = np.zeros(shape, np.int32)
    if fg_box is not None:
        label[fg_box] = 1
        label[fg_box[0], fg_box[1], fg_box[2].start : fg_box[2].start + 1] = 2
    return image, label


def _seed(i):
    return tf.constant([7, i], tf.int64)


def test_crop_equals_numpy_slicing():
    image, _ = _case()
    out = crop(tf.constant(image), [3, 4, 5], (4, 8, 6)).numpy()
    np.testing.assert_array_equal(out, image[3:7, 4:12, 5:11])


def test_foreground_locations_are_exact_and_bounded():
    _, label = _case(fg_box=(slice(2, 4), slice(3, 6), slice(5, 9)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    coords, classes = coords.numpy(), classes.numpy()
    assert len(coords) == np.count_nonzero(label)
    np.testing.assert_array_equal(label[tuple(coords.T)], classes)


def test_patches_are_slices_of_the_case_and_stay_inside():
    image, label = _case(fg_box=(slice(2, 4), slice(3, 6), slice(5, 9)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    patch = (4, 8, 8)
    for i in range(20):
        img, lab = sample_patch(
            tf.constant(image), tf.constant(label), coords, classes, patch, 0.5, _seed(i)
        )
        img, lab = img.numpy(), lab.numpy()
        assert img.shape == (*patch, 1) and lab.shape == patch
        # locate the patch in the case: it must be an exact sub-block
        hits = [
            (z, y, x)
            for z in range(12 - 4 + 1)
            for y in range(20 - 8 + 1)
            for x in range(24 - 8 + 1)
            if np.array_equal(image[z : z + 4, y : y + 8, x : x + 8], img)
        ]
        assert len(hits) == 1
        z, y, x = hits[0]
        np.testing.assert_array_equal(label[z : z + 4, y : y + 8, x : x + 8], lab)


def _uniform_hit_rate(label, patch):
    """Share of all valid patch positions whose block holds foreground (brute force)."""
    windows = sliding_window_view(label > 0, patch)
    return float(windows.any(axis=(-3, -2, -1)).mean())


def _within_binomial(hits, n, p, sds=4.0):
    """``hits`` of ``n`` is within ``sds`` binomial standard deviations of ``n * p``."""
    sd = np.sqrt(n * p * (1 - p))
    return abs(hits - n * p) <= sds * sd + 1e-9


@tf.function
def _has_foreground(image, label, coords, classes, share, seeds, min_fg=0.0, redraws=0):
    def one(seed):
        _, lab = sample_patch(
            image, label, coords, classes, (4, 8, 8), share, seed, min_fg, redraws
        )
        return tf.reduce_any(lab > 0)

    return tf.map_fn(one, seeds, fn_output_signature=tf.bool)


def _seeds(n, stream=7):
    return tf.stack([tf.fill([n], tf.constant(stream, tf.int64)), tf.range(n, dtype=tf.int64)], 1)


def test_foreground_share_is_honoured():
    # a tiny foreground blob: uniform patches rarely see it, centred ones always do
    image, label = _case(shape=(16, 48, 48), fg_box=(slice(1, 2), slice(2, 3), slice(3, 5)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    uniform = _uniform_hit_rate(label, (4, 8, 8))
    assert 0 < uniform < 0.05
    n = 2000
    for share in (0.0, 0.33, 1.0):
        hits = int(np.sum(_has_foreground(image, label, coords, classes, share, _seeds(n))))
        expected = share + (1 - share) * uniform  # centred patches always hold their centre
        assert _within_binomial(hits, n, expected), (share, hits / n, expected)


def test_centred_patches_choose_among_present_classes_uniformly():
    # class 2 is a single voxel column, class 1 a block: each is chosen half the time
    _, label = _case(shape=(16, 48, 48), fg_box=(slice(6, 10), slice(20, 28), slice(20, 28)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    patch = (4, 8, 8)
    n = 1000
    starts = tf.function(
        lambda seeds: tf.map_fn(
            lambda seed: patch_start(label.shape, patch, coords, classes, 1.0, seed),
            seeds,
            fn_output_signature=tf.int32,
        )
    )(_seeds(n)).numpy()
    centres = label[tuple((starts + np.array(patch) // 2).T)]
    assert set(np.unique(centres)) == {1, 2}  # never background
    assert _within_binomial(int(np.sum(centres == 2)), n, 0.5)


def test_blank_patch_skipping_redraws_a_bounded_number_of_times():
    # with uniform placement, k+1 independent draws see foreground with 1 - (1 - q)^(k+1)
    image, label = _case(shape=(16, 48, 48), fg_box=(slice(1, 2), slice(2, 3), slice(3, 5)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    q = _uniform_hit_rate(label, (4, 8, 8))
    n = 2000
    for redraws in (0, 3, 10):
        hits = int(
            np.sum(_has_foreground(image, label, coords, classes, 0.0, _seeds(n), 1e-6, redraws))
        )
        expected = 1 - (1 - q) ** (redraws + 1)
        assert _within_binomial(hits, n, expected), (redraws, hits / n, expected)


def test_blank_patch_skipping_keeps_the_draw_with_most_foreground():
    image, label = _case(fg_box=(slice(2, 4), slice(3, 6), slice(5, 9)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    patch = (4, 8, 8)
    for i in range(10):
        seed = _seed(i)
        start = choose_start(tf.constant(label), patch, coords, classes, 0.0, seed, 1.0, 5)
        # the same draws, by hand: the first from seed, redraws from fold_in(seed, j)
        draws = [patch_start(label.shape, patch, coords, classes, 0.0, seed)] + [
            patch_start(
                label.shape,
                patch,
                coords,
                classes,
                0.0,
                tf.random.experimental.stateless_fold_in(seed, tf.constant(j, tf.int64)),
            )
            for j in range(1, 6)
        ]
        fractions = [
            np.mean(
                label[tuple(slice(a, a + p) for a, p in zip(d.numpy(), patch, strict=True))] > 0
            )
            for d in draws
        ]
        z, y, x = start.numpy()
        got = np.mean(label[z : z + 4, y : y + 8, x : x + 8] > 0)
        assert got == max(fractions)
        assert float(foreground_fraction(crop(tf.constant(label), start, patch))) == got


def test_case_without_foreground_neither_hangs_nor_fails():
    image, label = _case()
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    assert coords.shape[0] == 0
    for i in range(5):
        img, lab = sample_patch(
            tf.constant(image), tf.constant(label), coords, classes, (4, 8, 8), 1.0, _seed(i)
        )
        assert img.shape == (4, 8, 8, 1) and not np.any(lab.numpy())


def test_case_without_foreground_with_blank_skipping_returns_after_the_redraws():
    image, label = _case()
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    got = _has_foreground(image, label, coords, classes, 1.0, _seeds(50), 0.5, 20).numpy()
    assert got.shape == (50,) and not got.any()


def test_same_seed_same_patch():
    image, label = _case(fg_box=(slice(2, 4), slice(3, 6), slice(5, 9)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    args = (tf.constant(image), tf.constant(label), coords, classes, (4, 8, 8), 0.5)
    a = sample_patch(*args, _seed(3))[0].numpy()
    b = sample_patch(*args, _seed(3))[0].numpy()
    c = sample_patch(*args, _seed(4))[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("k,channels", [(1, 1), (3, 2)])
def test_slab_to_slice_matches_numpy(k, channels):
    rng = np.random.default_rng(1)
    slab = rng.normal(size=(k, 6, 5, channels)).astype(np.float32)
    labels = rng.integers(0, 3, size=(k, 6, 5)).astype(np.int32)
    image, label = slab_to_slice(tf.constant(slab), tf.constant(labels))
    expected = np.concatenate([slab[z] for z in range(k)], axis=-1)  # slice-major channels
    np.testing.assert_array_equal(image.numpy(), expected)
    np.testing.assert_array_equal(label.numpy(), labels[k // 2])


def test_pad_case_matches_numpy_pad():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(5, 9, 14, 2)).astype(np.float32)
    label = rng.integers(0, 3, size=(5, 9, 14)).astype(np.uint8)
    min_shape, multiple = (8, 4, 4), 4
    target = [max(s, m) for s, m in zip(label.shape, min_shape, strict=True)]
    target = [-(-t // multiple) * multiple for t in target]
    assert target == [8, 12, 16]
    np.testing.assert_array_equal(padded_shape(label.shape, min_shape, multiple).numpy(), target)
    pads = [(0, t - s) for t, s in zip(target, label.shape, strict=True)]
    got_image, got_label = pad_case(tf.constant(image), tf.constant(label), min_shape, multiple)
    np.testing.assert_array_equal(got_image.numpy(), np.pad(image, pads + [(0, 0)]))
    np.testing.assert_array_equal(got_label.numpy(), np.pad(label, pads))
