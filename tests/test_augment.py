"""Augmentation ops against numpy/scipy references, on 2D and 3D, one and several channels.

Each transform is checked through :func:`augment` with only that transform switched on
(probability 1) and its range collapsed to one value, so the expected output is a plain
numpy/scipy computation. Boundaries: the warp clamps coordinates to the edge, which is
scipy's ``mode="nearest"``, so whole arrays are compared.
"""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import affine_transform, gaussian_filter, map_coordinates, zoom

from medseg.config import AugmentConfig, Config
from medseg.pipeline.augment import augment
from medseg.pipeline.spatial import upsample_field, warp

PROBABILITIES = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_probability")]
SHAPES = {2: (12, 14), 3: (6, 10, 12)}


def _only(**changes) -> AugmentConfig:
    """All transforms off except ``changes``."""
    return AugmentConfig(**{**{p: 0.0 for p in PROBABILITIES}, **changes})


def _case(ndim, channels, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    shape = SHAPES[ndim]
    image = rng.normal(size=(*shape, channels)).astype(np.float32)
    # smooth-ish content so interpolation differences are visible but bounded
    image = np.cumsum(image, axis=0).astype(np.float32)
    label = rng.integers(0, classes, size=shape).astype(np.int32)
    return image, label


def _run(image, label, config, seed=(1, 2)):
    out_image, out_label = augment(
        tf.constant(image), tf.constant(label), config, tf.constant(seed, tf.int64)
    )
    return out_image.numpy(), out_label.numpy()


def _rotation(angles, ndim):
    """R0 @ R1 @ R2, Ri rotating in the plane of the two other axes (the documented order)."""
    if ndim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        j, k = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[j, j] = r[k, k] = math.cos(angle)
        r[j, k], r[k, j] = -math.sin(angle), math.sin(angle)
        matrix = matrix @ r
    return matrix


def _reference_affine(image, label, matrix):
    shape = np.array(image.shape[:-1])
    centre = (shape - 1) / 2
    offset = centre - matrix @ centre
    ref = np.stack(
        [
            affine_transform(image[..., c], matrix, offset, order=1, mode="nearest")
            for c in range(image.shape[-1])
        ],
        -1,
    )
    # nearest label: round half up of the clamped source coordinate
    grid = np.indices(tuple(shape)).reshape(len(shape), -1).astype(float)
    coords = matrix @ grid + offset[:, None]
    coords = np.clip(coords, 0, (shape - 1)[:, None])
    ties = np.any(np.abs(coords - np.floor(coords) - 0.5) < 1e-3, axis=0)
    index = np.floor(coords + 0.5).astype(int)
    ref_label = label[tuple(index)].reshape(label.shape)
    return ref, ref_label, ties.reshape(label.shape)


@pytest.mark.parametrize("ndim, channels", [(2, 1), (3, 1), (3, 2)])
def test_rotation_and_scaling_are_one_affine_pass_matching_scipy(ndim, channels):
    image, label = _case(ndim, channels)
    degrees, factor = 17.0, 1.25
    config = _only(
        rotation_probability=1.0,
        rotation_degrees=(degrees, degrees),
        scale_probability=1.0,
        scale_range=(factor, factor),
    )
    out, out_label = _run(image, label, config)
    matrix = _rotation([math.radians(degrees)] * (1 if ndim == 2 else 3), ndim) / factor
    ref, ref_label, ties = _reference_affine(image, label, matrix)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_array_equal(out_label[~ties], ref_label[~ties])
    assert out.dtype == np.float32 and out_label.dtype == np.int32


def test_rotation_about_chosen_axes_only():
    image, label = _case(3, 1)
    config = _only(rotation_probability=1.0, rotation_degrees=(30.0, 30.0), rotation_axes=(0,))
    out, out_label = _run(image, label, config)
    ref, ref_label, ties = _reference_affine(
        image, label, _rotation([math.radians(30.0), 0.0, 0.0], 3)
    )
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_array_equal(out_label[~ties], ref_label[~ties])


@pytest.mark.parametrize("ndim", [2, 3])
def test_anisotropic_scaling_matches_scipy(ndim):
    image, label = _case(ndim, 1, seed=3)
    config = _only(scale_probability=1.0, scale_range=(0.8, 0.8), scale_per_axis=True)
    out, _ = _run(image, label, config)
    ref, _, _ = _reference_affine(image, label, np.eye(ndim) / 0.8)
    np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_with_a_displacement_field_matches_map_coordinates(ndim):
    image, label = _case(ndim, 2, seed=4)
    shape = image.shape[:-1]
    grid_shape = (3,) * ndim
    coarse = np.random.default_rng(5).normal(0, 2.0, size=(*grid_shape, ndim)).astype(np.float32)
    matrix = _rotation([0.2] * (1 if ndim == 2 else 3), ndim).astype(np.float32)
    offset = np.full(ndim, 0.3, np.float32)
    out, out_label = warp(tf.constant(image), tf.constant(label), matrix, offset, coarse)
    field = np.stack(
        [
            zoom(coarse[..., i], np.array(shape) / np.array(grid_shape), order=1, grid_mode=False)
            for i in range(ndim)
        ]
    )
    grid = np.indices(shape).astype(float)
    coords = np.einsum("ij,j...->i...", matrix, grid) + offset.reshape(-1, *[1] * ndim) + field
    ref = np.stack(
        [map_coordinates(image[..., c], coords, order=1, mode="nearest") for c in range(2)], -1
    )
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)
    assert set(np.unique(out_label.numpy())) <= set(np.unique(label))


def test_field_upsampling_matches_scipy_zoom():
    coarse = np.random.default_rng(6).normal(size=(3, 4, 2, 3)).astype(np.float32)
    out = upsample_field(tf.constant(coarse), (7, 9, 5)).numpy()
    ref = np.stack(
        [zoom(coarse[..., i], (7 / 3, 9 / 4, 5 / 2), order=1, grid_mode=False) for i in range(3)]
    )
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("ndim, channels", [(2, 2), (3, 1)])
def test_elastic_deformation_moves_voxels_and_keeps_labels(ndim, channels):
    image, label = _case(ndim, channels, seed=7)
    config = _only(elastic_probability=1.0, elastic_magnitude=(3.0, 3.0), elastic_grid_spacing=4)
    out, out_label = _run(image, label, config)
    assert not np.allclose(out, image)
    assert set(np.unique(out_label)) <= {0, 1, 2}
    # zero magnitude is the identity warp
    still = _only(elastic_probability=1.0, elastic_magnitude=(0.0, 0.0))
    out, out_label = _run(image, label, still)
    np.testing.assert_allclose(out, image, atol=1e-5)
    np.testing.assert_array_equal(out_label, label)


@pytest.mark.parametrize("ndim, channels", [(2, 1), (3, 2)])
def test_flips_match_np_flip(ndim, channels):
    image, label = _case(ndim, channels)
    out, out_label = _run(image, label, _only(flip_probability=1.0, flip_axes=(0, ndim - 1)))
    np.testing.assert_array_equal(out, np.flip(image, (0, ndim - 1)))
    np.testing.assert_array_equal(out_label, np.flip(label, (0, ndim - 1)))
    # axes a 2D patch does not have are ignored (the default is (0, 1, 2))
    out, _ = _run(image, label, _only(flip_probability=1.0))
    np.testing.assert_array_equal(out, np.flip(image, tuple(range(ndim))))


@pytest.mark.parametrize("shape", [(4, 6, 6), (8, 8), (4, 6, 7)])
def test_rot90_matches_np_rot90_in_the_last_plane(shape):
    rng = np.random.default_rng(8)
    image = rng.normal(size=(*shape, 2)).astype(np.float32)
    label = rng.integers(0, 3, size=shape).astype(np.int32)
    axes = (len(shape) - 2, len(shape) - 1)
    square = shape[-1] == shape[-2]
    seen = set()
    for seed in range(12):
        out, out_label = _run(image, label, _only(rot90_probability=1.0), seed=(seed, 0))
        matches = [k for k in (1, 2, 3) if np.array_equal(out, np.rot90(image, k, axes))]
        assert len(matches) == 1
        np.testing.assert_array_equal(out_label, np.rot90(label, matches[0], axes))
        seen.add(matches[0])
    assert seen == ({1, 2, 3} if square else {2})


@pytest.mark.parametrize("ndim, channels", [(2, 1), (3, 2)])
def test_gaussian_blur_matches_scipy(ndim, channels):
    image, label = _case(ndim, channels)
    out, out_label = _run(image, label, _only(blur_probability=1.0, blur_sigma=(0.8, 0.8)))
    ref = np.stack(
        [gaussian_filter(image[..., c], 0.8, mode="reflect") for c in range(channels)], -1
    )
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_array_equal(out_label, label)


@pytest.mark.parametrize("ndim, channels", [(2, 2), (3, 1)])
def test_brightness_and_contrast_match_numpy(ndim, channels):
    image, label = _case(ndim, channels)
    axes = tuple(range(ndim))
    out, _ = _run(image, label, _only(brightness_probability=1.0, brightness_range=(1.2, 1.2)))
    np.testing.assert_allclose(out, image * 1.2, rtol=1e-6)
    out, _ = _run(image, label, _only(contrast_probability=1.0, contrast_range=(1.3, 1.3)))
    mean = image.mean(axes)
    ref = np.clip((image - mean) * 1.3 + mean, image.min(axes), image.max(axes))
    np.testing.assert_allclose(out, ref, atol=1e-4)


def _gamma_reference(image, gamma, axes):
    low, high = image.min(axes), image.max(axes)
    span = high - low + 1e-7
    out = ((image - low) / span) ** gamma * span + low
    return (out - out.mean(axes)) / (out.std(axes) + 1e-8) * image.std(axes) + image.mean(axes)


@pytest.mark.parametrize("ndim, channels", [(2, 1), (3, 2)])
def test_gamma_and_inverted_gamma_match_numpy(ndim, channels):
    image, label = _case(ndim, channels)
    axes = tuple(range(ndim))
    out, _ = _run(image, label, _only(gamma_probability=1.0, gamma_range=(1.4, 1.4)))
    np.testing.assert_allclose(out, _gamma_reference(image, 1.4, axes), atol=1e-3)
    out, _ = _run(image, label, _only(gamma_invert_probability=1.0, gamma_range=(0.8, 0.8)))
    np.testing.assert_allclose(out, -_gamma_reference(-image, 0.8, axes), atol=1e-3)


@pytest.mark.parametrize("ndim, channels", [(2, 2), (3, 1)])
def test_low_resolution_is_nearest_down_then_linear_up(ndim, channels):
    image, label = _case(ndim, channels)
    factor = 0.5
    out, _ = _run(image, label, _only(lowres_probability=1.0, lowres_zoom=(factor, factor)))
    shape = image.shape[:-1]
    low = [max(round(s * factor), 1) for s in shape]
    index = [
        np.minimum(np.floor((np.arange(n) + 0.5) * s / n).astype(int), s - 1)
        for n, s in zip(low, shape, strict=True)
    ]
    small = image[np.ix_(*index, np.arange(channels))]
    axes = [
        np.clip((np.arange(s) + 0.5) * n / s - 0.5, 0, n - 1) for s, n in zip(shape, low, strict=True)
    ]
    grid = np.meshgrid(*axes, indexing="ij")
    ref = np.stack(
        [map_coordinates(small[..., c], grid, order=1, mode="nearest") for c in range(channels)],
        -1,
    )
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_noise_has_the_configured_spread():
    image = np.zeros((16, 24, 24, 2), np.float32)
    label = np.zeros(image.shape[:-1], np.int32)
    out, _ = _run(image, label, _only(noise_probability=1.0, noise_std=(0.5, 0.5)))
    assert abs(out.mean()) < 0.02 and abs(out.std() - 0.5) < 0.01
    # independent per channel
    assert abs(np.corrcoef(out[..., 0].ravel(), out[..., 1].ravel())[0, 1]) < 0.03


def test_probability_zero_is_identity_and_disabled_is_identity():
    image, label = _case(3, 2)
    out, out_label = _run(image, label, _only())
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(out_label, label)
    all_on = AugmentConfig(**{p: 1.0 for p in PROBABILITIES}, enabled=False)
    out, out_label = _run(image, label, all_on)
    np.testing.assert_array_equal(out, image)


def _everything(probability):
    return AugmentConfig(**{p: probability for p in PROBABILITIES}, elastic_grid_spacing=4)


@pytest.mark.parametrize("ndim, channels", [(2, 3), (3, 1)])
def test_seed_determines_output_and_labels_stay_in_their_set(ndim, channels):
    image, label = _case(ndim, channels, classes=4)
    label[label == 2] = 3  # label set {0, 1, 3}: no interpolated 2 may appear
    config = _everything(0.5)
    a = _run(image, label, config, seed=(3, 4))
    b = _run(image, label, config, seed=(3, 4))
    c = _run(image, label, config, seed=(3, 5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    for seed in range(6):
        out, out_label = _run(image, label, _everything(1.0), seed=(seed, 9))
        assert out.shape == image.shape and out_label.shape == label.shape
        assert set(np.unique(out_label)) <= {0, 1, 3}
        assert np.all(np.isfinite(out))


@pytest.mark.slow  # XLA compiles every kernel again inside tf.data: seconds
def test_xla_inside_tf_data_matches_the_plain_graph():
    # the XLA kernels run inside a tf.data map (where they are used), the reference is
    # the same augmentation without XLA, called eagerly
    image, label = _case(3, 2)
    config = _everything(1.0)
    seeds = [(i, 7) for i in range(2)]
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).map(
        lambda s: augment(tf.constant(image), tf.constant(label), config, s),
        num_parallel_calls=2,
    )
    no_jit = dataclasses.replace(config, jit=False)
    for (x, y), seed in zip(ds.as_numpy_iterator(), seeds, strict=True):
        ex, ey = _run(image, label, no_jit, seed)
        assert not np.allclose(x, image)
        np.testing.assert_allclose(x, ex, atol=1e-4)
        np.testing.assert_array_equal(y, ey)


def test_config_errors_name_the_key_and_cli_overrides_parse():
    image, label = _case(2, 1)
    # checked when the config is made, before any augmentation is built
    with pytest.raises(ValueError, match=r"'augment.flip_probability': 1.5 is not a probability"):
        AugmentConfig(flip_probability=1.5)
    with pytest.raises(ValueError, match=r"augment.scale_range=\[1.2, 0.9\]: low must not"):
        _run(image, label, AugmentConfig(scale_range=(1.2, 0.9)))
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        augment(tf.zeros([4, 1]), None, AugmentConfig(), tf.constant([0, 0]))
    config = Config().with_overrides(["augment.flip_axes=1,2", "augment.noise_std=0,0.2"])
    assert config.augment.flip_axes == (1, 2) and config.augment.noise_std == (0.0, 0.2)


@pytest.mark.parametrize("shape", [(6, 8, 8), (6, 8, 10)])
def test_unknown_static_shapes_give_the_same_result(shape):
    # whole-case ("full") patches have no static shape inside tf.data
    rng = np.random.default_rng(11)
    image = rng.normal(size=(*shape, 1)).astype(np.float32)
    label = rng.integers(0, 3, size=shape).astype(np.int32)
    config = dataclasses.replace(_everything(1.0), jit=False)  # XLA: once per shape, slow here
    sig = (tf.TensorSpec([None] * 4, tf.float32), tf.TensorSpec([None] * 3, tf.int32))
    ds = tf.data.Dataset.from_generator(lambda: iter([(image, label)]), output_signature=sig)
    x, y = next(iter(ds.map(lambda im, lab: augment(im, lab, config, tf.constant([5, 6])))))
    ex, ey = _run(image, label, config, seed=(5, 6))
    np.testing.assert_allclose(x.numpy(), ex, atol=1e-4)
    np.testing.assert_array_equal(y.numpy(), ey)


# -- bias field ------------------------------------------------------------------------------


def numpy_bias_field(shape, coefficients, magnitude):
    """The field by hand: degree-1 then degree-2 monomials of [-1, 1] coordinates."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    ndim = len(shape)
    terms = [grids[i] for i in range(ndim)]
    terms += [grids[i] * grids[j] for i in range(ndim) for j in range(i, ndim)]
    f = sum(c * t for c, t in zip(coefficients, terms, strict=True))
    return np.exp(magnitude * f / np.abs(f).max())


@pytest.mark.parametrize("shape", [(5, 7, 9), (8, 6)])
def test_bias_field_matches_numpy_and_spans_the_magnitude(shape):
    from medseg.pipeline.augment import bias_field

    rng = np.random.default_rng(1)
    ndim = len(shape)
    coefficients = rng.uniform(-1, 1, ndim + ndim * (ndim + 1) // 2)
    field = bias_field(shape, coefficients, 0.2).numpy()
    np.testing.assert_allclose(field, numpy_bias_field(shape, coefficients, 0.2), rtol=1e-5)
    # the normalised polynomial reaches ±1 at one end: the field reaches exp(±0.2) there
    assert np.isclose(max(field.max(), 1 / field.min()), np.exp(0.2), rtol=1e-5)


def test_bias_field_scales_the_signal_above_the_darkest_value():
    from medseg.pipeline.augment import apply_bias_field

    rng = np.random.default_rng(2)
    image = rng.normal(size=(4, 5, 6, 2)).astype(np.float32)
    field = rng.uniform(0.8, 1.2, size=(4, 5, 6)).astype(np.float32)
    out = apply_bias_field(tf.constant(image), tf.constant(field)).numpy()
    low = image.min(axis=(0, 1, 2))
    np.testing.assert_allclose(out, (image - low) * field[..., None] + low, rtol=1e-5, atol=1e-6)
    # the darkest voxel of each channel keeps its value
    np.testing.assert_allclose(out.min(axis=(0, 1, 2)), low, atol=1e-6)


def test_bias_field_with_a_pedestal_pivots_below_the_darkest_value():
    from medseg.pipeline.augment import apply_bias_field

    rng = np.random.default_rng(3)
    image = rng.normal(size=(4, 5, 6, 2)).astype(np.float32)
    field = rng.uniform(0.8, 1.2, size=(4, 5, 6)).astype(np.float32)
    out = apply_bias_field(tf.constant(image), tf.constant(field), 0.7).numpy()
    low, high = image.min(axis=(0, 1, 2)), image.max(axis=(0, 1, 2))
    pivot = low - 0.7 * (high - low)
    expected = (image - pivot) * field[..., None] + pivot
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # the darkest voxel moves now: the field scales the pedestal under it too
    darkest = np.unravel_index(image[..., 0].argmin(), image.shape[:3])
    assert not np.isclose(out[(*darkest, 0)], low[0])


def test_bias_field_pedestal_is_drawn_in_its_range_and_checked():
    from medseg.pipeline.augment import draw_parameters

    config = AugmentConfig(bias_field_probability=1.0, bias_field_pedestal=(0.25, 0.75))
    seeds = [tf.constant([5, i], tf.int64) for i in range(20)]
    drawn = [
        float(draw_parameters(config, seed, (6, 8, 8), 1)["bias_field_pedestal"])
        for seed in seeds
    ]
    assert all(0.25 <= d <= 0.75 for d in drawn) and len(set(drawn)) == 20
    # the default draws none: the field pivots about the darkest value, as before
    default = draw_parameters(AugmentConfig(), seeds[0], (6, 8, 8), 1)
    assert float(default["bias_field_pedestal"]) == 0.0
    image = tf.zeros((6, 8, 8, 1))
    label = tf.zeros((6, 8, 8), tf.int32)
    seed = tf.constant([1, 2], tf.int64)
    with pytest.raises(ValueError, match=r"augment.bias_field_pedestal=\[-0.5, 1.0\] must not"):
        augment(image, label, AugmentConfig(bias_field_pedestal=(-0.5, 1.0)), seed)


def test_random_bias_field_is_seeded_off_by_default_and_leaves_labels_alone():
    config = AugmentConfig(jit=False, enabled=True)
    assert config.bias_field_probability == 0.0
    only_bias = AugmentConfig(
        jit=False, flip_probability=0.0, rotation_probability=0.0, scale_probability=0.0,
        noise_probability=0.0, blur_probability=0.0, brightness_probability=0.0,
        contrast_probability=0.0, lowres_probability=0.0, gamma_probability=0.0,
        gamma_invert_probability=0.0, bias_field_probability=1.0,
        bias_field_magnitude=(0.3, 0.3),
    )
    rng = np.random.default_rng(4)
    image = tf.constant(rng.normal(size=(6, 8, 8, 1)).astype(np.float32))
    label = tf.constant(rng.integers(0, 3, size=(6, 8, 8)).astype(np.int32))
    seed = tf.constant([7, 1], tf.int64)
    out, out_label = augment(image, label, only_bias, seed)
    again, _ = augment(image, label, only_bias, seed)
    np.testing.assert_array_equal(out.numpy(), again.numpy())
    np.testing.assert_array_equal(out_label.numpy(), label.numpy())
    # what it did is a field of exactly the drawn magnitude about the minimum
    low = image.numpy().min()
    ratio = (out.numpy() - low) / (image.numpy() - low + 1e-12)
    inside = image.numpy() - low > 1e-3
    assert np.isclose(max(ratio[inside].max(), 1 / ratio[inside].min()), np.exp(0.3), rtol=1e-2)
    with pytest.raises(ValueError, match=r"augment.bias_field_magnitude=\[0.3, 0.1\]: low must"):
        augment(image, label, AugmentConfig(bias_field_magnitude=(0.3, 0.1)), seed)
