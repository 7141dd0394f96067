"""Patch sampling: placement, foreground share, and cases without foreground."""

import numpy as np
import tensorflow as tf

from medseg.pipeline.patches import crop, foreground_locations, sample_patch


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


def test_foreground_share_is_honoured():
    # a tiny foreground blob: uniform patches rarely see it, centred ones always do
    image, label = _case(shape=(16, 48, 48), fg_box=(slice(1, 2), slice(2, 3), slice(3, 5)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    n = 300
    for share in (0.0, 0.33, 1.0):
        with_fg = 0
        for i in range(n):
            _, lab = sample_patch(
                tf.constant(image), tf.constant(label), coords, classes, (4, 8, 8), share, _seed(i)
            )
            with_fg += bool(np.any(lab.numpy() > 0))
        # uniform placement hits the blob with probability ≈ 4*8*8*2 / (13*41*41) ≈ 2 %
        expected = share + (1 - share) * 0.03
        assert abs(with_fg / n - expected) < 0.08, (share, with_fg / n)


def test_case_without_foreground_neither_hangs_nor_fails():
    image, label = _case()
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    assert coords.shape[0] == 0
    for i in range(5):
        img, lab = sample_patch(
            tf.constant(image), tf.constant(label), coords, classes, (4, 8, 8), 1.0, _seed(i)
        )
        assert img.shape == (4, 8, 8, 1) and not np.any(lab.numpy())


def test_same_seed_same_patch():
    image, label = _case(fg_box=(slice(2, 4), slice(3, 6), slice(5, 9)))
    coords, classes = foreground_locations(tf.constant(label), 3, _seed(0))
    args = (tf.constant(image), tf.constant(label), coords, classes, (4, 8, 8), 0.5)
    a = sample_patch(*args, _seed(3))[0].numpy()
    b = sample_patch(*args, _seed(3))[0].numpy()
    c = sample_patch(*args, _seed(4))[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
