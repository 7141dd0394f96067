"""Preprocessing ops against numpy/scipy references."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import map_coordinates

from medseg.config import PreprocessConfig
from medseg.pipeline import (
    PreprocessPlan,
    normalize,
    plan_preprocessing,
    preprocess_case,
    resample,
    resample_labels,
    resampled_shape,
)
from medseg.pipeline.geometry import prepare_case
from medseg.pipeline.preprocess import (
    anisotropic_axis,
    crop_to_box,
    nonzero_box,
    one_hot,
    pad_to_shape,
)

FINGERPRINT = {
    "foreground_intensity": {
        "percentile_00_5": -50.0,
        "percentile_99_5": 250.0,
        "mean": 120.0,
        "std": 40.0,
    }
}


def _centre_coords(new_shape, old_shape):
    """Half-pixel-centre sample positions, clamped to the input (the documented convention)."""
    axes = [
        np.clip((np.arange(n) + 0.5) * s / n - 0.5, 0, s - 1)
        for n, s in zip(new_shape, old_shape, strict=True)
    ]
    return np.meshgrid(*axes, indexing="ij")


@pytest.mark.parametrize("new_shape", [(10, 6, 17), (3, 11, 13), (14, 22, 5)])
def test_linear_resampling_matches_scipy_map_coordinates(new_shape):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(7, 11, 13, 2)).astype(np.float32)
    out = resample(tf.constant(volume), new_shape).numpy()
    grid = _centre_coords(new_shape, volume.shape[:3])
    ref = np.stack(
        [map_coordinates(volume[..., c], grid, order=1, mode="nearest") for c in range(2)], -1
    )
    assert out.shape == (*new_shape, 2)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_identity_resampling_returns_the_input():
    volume = np.random.default_rng(1).normal(size=(5, 6, 7, 1)).astype(np.float32)
    np.testing.assert_allclose(resample(tf.constant(volume), (5, 6, 7)).numpy(), volume, atol=1e-6)


def test_nearest_label_resampling_matches_reference_and_keeps_label_set():
    rng = np.random.default_rng(2)
    label = rng.integers(0, 3, size=(7, 11, 13)).astype(np.int32)
    new_shape = (12, 5, 20)
    out = resample_labels(tf.constant(label), new_shape).numpy()
    index = [
        np.minimum(np.floor((np.arange(n) + 0.5) * s / n).astype(int), s - 1)
        for n, s in zip(new_shape, label.shape, strict=True)
    ]
    np.testing.assert_array_equal(out, label[np.ix_(*index)])
    assert set(np.unique(out)) <= {0, 1, 2}
    assert out.dtype == np.int32


def test_resampled_shape_follows_spacing_ratio():
    shape = resampled_shape([40, 128, 128], [4.0, 0.75, 0.75], (3.0, 1.5, 1.5)).numpy()
    np.testing.assert_array_equal(shape, [53, 64, 64])


def test_plan_from_fingerprint_and_fixed_bounds():
    plan = plan_preprocessing(PreprocessConfig(), FINGERPRINT)
    assert plan.clip == (-50.0, 250.0)
    assert (plan.mean, plan.std) == (120.0, 40.0)
    fixed = plan_preprocessing(
        PreprocessConfig(clip=(-79, 304), normalize="image", target_spacing=None), FINGERPRINT
    )
    assert fixed.clip == (-79.0, 304.0) and fixed.mean is None and fixed.target_spacing is None
    assert PreprocessPlan.from_dict(plan.to_dict()) == plan


def test_plan_errors_are_clear():
    with pytest.raises(ValueError, match="no foreground voxels"):
        plan_preprocessing(PreprocessConfig(), {"foreground_intensity": None})
    with pytest.raises(ValueError, match="lower bound must be below upper"):
        plan_preprocessing(PreprocessConfig(clip=(10, -10)), FINGERPRINT)
    with pytest.raises(ValueError, match="'preprocess.normalize': 'cubic' is not one of 'fingerprint'"):
        PreprocessConfig(normalize="cubic")  # refused when the config is made
    with pytest.raises(ValueError, match="normalize='ct' clips to the fingerprint's percentiles"):
        plan_preprocessing(PreprocessConfig(normalize="ct", clip=(-79, 304)), FINGERPRINT)
    with pytest.raises(ValueError, match="anisotropy_threshold=1.0 must be above 1"):
        plan_preprocessing(PreprocessConfig(anisotropy_threshold=1.0), FINGERPRINT)


def test_normalize_clips_then_zscores():
    image = np.array([-1000.0, -50.0, 100.0, 250.0, 3000.0], np.float32)[:, None]
    plan = PreprocessPlan(target_spacing=None, clip=(-50.0, 250.0), mean=120.0, std=40.0)
    expected = (np.clip(image, -50, 250) - 120.0) / 40.0
    np.testing.assert_allclose(normalize(tf.constant(image), plan).numpy(), expected, rtol=1e-6)
    per_image = PreprocessPlan(target_spacing=None, clip=None, mean=None, std=None)
    out = normalize(tf.constant(image), per_image).numpy()
    np.testing.assert_allclose(out, (image - image.mean()) / image.std(), rtol=1e-5)


def test_preprocess_case_resamples_image_and_label_together():
    rng = np.random.default_rng(3)
    image = rng.integers(-100, 300, size=(6, 20, 20)).astype(np.int16)
    label = (image > 100).astype(np.uint8)
    # spacing ratio 2 < 3: linear along every axis
    plan = PreprocessPlan(target_spacing=(3.0, 2.0, 2.0), clip=None, mean=0.0, std=1.0)
    out_image, out_label = preprocess_case(
        tf.constant(image), tf.constant(label), tf.constant([2.0, 1.0, 1.0]), plan
    )
    assert out_image.shape == (4, 10, 10, 1) and out_label.shape == (4, 10, 10)
    grid = _centre_coords((4, 10, 10), image.shape)
    ref = map_coordinates(image.astype(np.float32), grid, order=1, mode="nearest")
    np.testing.assert_allclose(out_image.numpy()[..., 0], ref, atol=1e-3)
    assert set(np.unique(out_label.numpy())) <= {0, 1}


def _nearest_index(new, old):
    """Half-pixel nearest neighbour: output o reads floor((o + 0.5) * old / new)."""
    return np.minimum(np.floor((np.arange(new) + 0.5) * old / new).astype(int), old - 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_2d_linear_resampling_matches_scipy(channels):
    image = np.random.default_rng(4).normal(size=(9, 14, channels)).astype(np.float32)
    out = resample(tf.constant(image), (13, 6)).numpy()
    grid = _centre_coords((13, 6), image.shape[:2])
    ref = np.stack(
        [map_coordinates(image[..., c], grid, order=1, mode="nearest") for c in range(channels)],
        -1,
    )
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_2d_label_resampling_keeps_labels():
    label = np.random.default_rng(5).integers(0, 4, size=(9, 14)).astype(np.int32)
    out = resample_labels(tf.constant(label), (5, 23)).numpy()
    np.testing.assert_array_equal(out, label[np.ix_(_nearest_index(5, 9), _nearest_index(23, 14))])


@pytest.mark.parametrize(
    "spacing, target, axis",
    [
        ((5.0, 1.0, 1.0), (2.5, 1.5, 1.5), 0),  # thick slices: no interpolation across them
        ((1.0, 1.0, 1.0), (1.0, 1.0, 4.0), 2),  # isotropic data, anisotropic target
        ((1.0, 4.0, 1.0), (1.0, 1.0, 1.0), 1),
        ((3.0, 1.0, 1.0), (3.0, 1.5, 1.5), -1),  # ratio 3 is not above the threshold
        ((4.0, 4.0, 1.0), (2.0, 2.0, 2.0), -1),  # two coarse axes: nnU-Net interpolates all
    ],
)
def test_anisotropic_axis_follows_nnunet(spacing, target, axis):
    assert int(anisotropic_axis(spacing, target, 3.0)) == axis


def test_anisotropic_resampling_is_nearest_along_the_coarse_axis_only():
    rng = np.random.default_rng(6)
    image = rng.normal(size=(5, 8, 9)).astype(np.float32)
    label = rng.integers(0, 3, size=image.shape).astype(np.uint8)
    plan = PreprocessPlan(target_spacing=(2.5, 1.5, 1.5), clip=None, mean=0.0, std=1.0)
    out, out_label = preprocess_case(
        tf.constant(image), tf.constant(label), tf.constant([5.0, 1.0, 1.0]), plan
    )
    new_shape = (10, 5, 6)
    assert out.shape == (*new_shape, 1)
    _, gy, gx = _centre_coords(new_shape, image.shape)
    gz = np.broadcast_to(_nearest_index(10, 5)[:, None, None], new_shape).astype(float)
    ref = map_coordinates(image, [gz, gy, gx], order=1, mode="nearest")
    np.testing.assert_allclose(out.numpy()[..., 0], ref, atol=1e-5)
    index = np.ix_(*[_nearest_index(n, o) for n, o in zip(new_shape, image.shape, strict=True)])
    np.testing.assert_array_equal(out_label.numpy(), label[index])
    # the same case with the rule switched off interpolates along the slices
    linear = dataclasses.replace(plan, anisotropy_threshold=10.0)
    out_linear, _ = preprocess_case(tf.constant(image), None, tf.constant([5.0, 1.0, 1.0]), linear)
    ref_linear = map_coordinates(image, _centre_coords(new_shape, image.shape), order=1, mode="nearest")
    np.testing.assert_allclose(out_linear.numpy()[..., 0], ref_linear, atol=1e-5)


def test_per_image_normalizations_are_per_channel():
    rng = np.random.default_rng(7)
    image = (rng.normal(size=(4, 5, 6, 2)) * [1.0, 50.0] + [0.0, 300.0]).astype(np.float32)
    base = PreprocessPlan(target_spacing=None, clip=None, mean=None, std=None)
    z = normalize(tf.constant(image), base).numpy()
    ref = (image - image.mean((0, 1, 2))) / image.std((0, 1, 2))
    np.testing.assert_allclose(z, ref, atol=1e-4)
    mm = normalize(tf.constant(image), dataclasses.replace(base, normalize="minmax")).numpy()
    low, high = image.min((0, 1, 2)), image.max((0, 1, 2))
    np.testing.assert_allclose(mm, (image - low) / (high - low), atol=1e-5)
    clipped = dataclasses.replace(base, normalize="none", clip=(0.0, 310.0))
    np.testing.assert_array_equal(
        normalize(tf.constant(image), clipped).numpy(), np.clip(image, 0.0, 310.0)
    )


def test_ct_preset_and_per_channel_fingerprint_plans():
    ct = plan_preprocessing(PreprocessConfig(normalize="ct"), FINGERPRINT)
    assert (ct.clip, ct.mean, ct.std) == ((-50.0, 250.0), 120.0, 40.0)
    image = np.array([-300.0, -50.0, 0.0, 249.0, 900.0], np.float32)[:, None]
    np.testing.assert_allclose(
        normalize(tf.constant(image), ct).numpy(), (np.clip(image, -50, 250) - 120) / 40, rtol=1e-6
    )
    two = {
        "foreground_intensity": FINGERPRINT["foreground_intensity"],
        "foreground_intensity_per_channel": [
            FINGERPRINT["foreground_intensity"],
            {"percentile_00_5": 0.0, "percentile_99_5": 10.0, "mean": 4.0, "std": 2.0},
        ],
    }
    plan = plan_preprocessing(PreprocessConfig(normalize="ct"), two)
    assert plan.clip == ((-50.0, 0.0), (250.0, 10.0))
    assert (plan.mean, plan.std) == ((120.0, 4.0), (40.0, 2.0))
    assert PreprocessPlan.from_dict(plan.to_dict()) == plan
    image = np.random.default_rng(8).uniform(-100, 400, size=(3, 4, 5, 2)).astype(np.float32)
    lo, hi = np.array([-50.0, 0.0]), np.array([250.0, 10.0])
    ref = (np.clip(image, lo, hi) - [120.0, 4.0]) / [40.0, 2.0]
    np.testing.assert_allclose(normalize(tf.constant(image), plan).numpy(), ref, rtol=1e-5)


def test_plan_from_an_older_dict_gets_the_defaults():
    old = {"target_spacing": [3, 1.5, 1.5], "clip": None, "mean": 1.0, "std": 2.0}
    plan = PreprocessPlan.from_dict(old)
    assert plan.normalize == "zscore" and not plan.crop_to_nonzero
    assert plan.anisotropy_threshold == 3.0


def _numpy_box(mask):
    where = np.nonzero(mask)
    return [int(w.min()) for w in where], [int(w.max()) + 1 for w in where]


@pytest.mark.parametrize("threshold", [None, -500.0])
def test_nonzero_box_of_any_channel(threshold):
    rng = np.random.default_rng(9)
    background = 0.0 if threshold is None else -1000.0
    image = np.full((7, 9, 11, 2), background, np.float32)
    image[2:5, 3:4, 1:6, 0] = rng.normal(100, 1, size=(3, 1, 5))
    image[3:6, 5:8, 4:5, 1] = rng.normal(100, 1, size=(3, 3, 1))
    start, stop = nonzero_box(tf.constant(image), threshold)
    ref = _numpy_box(np.any(image != background, axis=-1))
    assert (start.numpy().tolist(), stop.numpy().tolist()) == ref == ([2, 3, 1], [6, 8, 6])


def test_empty_image_keeps_the_whole_box_and_crop_slices():
    start, stop = nonzero_box(tf.zeros([4, 5, 1]))
    assert start.numpy().tolist() == [0, 0] and stop.numpy().tolist() == [4, 5]
    x = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    np.testing.assert_array_equal(crop_to_box(tf.constant(x), [1, 2], [3, 5]).numpy(), x[1:3, 2:5])


def test_preprocess_case_crops_image_and_label_together():
    rng = np.random.default_rng(10)
    image = np.zeros((6, 10, 12), np.float32)
    image[1:5, 2:9, 3:7] = rng.uniform(1, 2, size=(4, 7, 4))
    label = np.zeros(image.shape, np.int32)
    label[2:4, 3:5, 4:6] = 2
    plan = PreprocessPlan(
        target_spacing=None, clip=None, mean=None, std=None, normalize="none",
        crop_to_nonzero=True,
    )  # fmt: skip
    out, out_label = preprocess_case(
        tf.constant(image), tf.constant(label), tf.constant([1.0, 1.0, 1.0]), plan
    )
    np.testing.assert_array_equal(out.numpy()[..., 0], image[1:5, 2:9, 3:7])
    np.testing.assert_array_equal(out_label.numpy(), label[1:5, 2:9, 3:7])
    # for prediction, the geometry record holds the box and maps results back into it
    prepared, geometry = prepare_case(image, (1.0, 1.0, 1.0), plan)
    np.testing.assert_array_equal(prepared.numpy(), out.numpy())
    assert geometry.start == (1, 2, 3) and geometry.stop == (5, 9, 7)
    assert geometry.source_shape == image.shape and geometry.nearest_axis == -1
    onehot = tf.one_hot(out_label, 3)
    labels, probs = geometry.invert(onehot)
    np.testing.assert_array_equal(labels, label)  # the label, put back in its place
    np.testing.assert_array_equal(probs[..., 0][label == 0], 1.0)  # outside: background


def test_pad_to_shape_matches_numpy_and_leaves_large_axes():
    x = np.arange(3 * 8 * 2, dtype=np.float32).reshape(3, 8, 2)
    out = pad_to_shape(tf.constant(x), (6, 5), value=-1).numpy()
    np.testing.assert_array_equal(out, np.pad(x, [(1, 2), (0, 0), (0, 0)], constant_values=-1))


def test_preprocess_case_pads_to_min_shape_in_2d_with_channels():
    rng = np.random.default_rng(11)
    image = rng.normal(size=(5, 7, 2)).astype(np.float32)
    label = rng.integers(0, 2, size=(5, 7)).astype(np.int32)
    plan = PreprocessPlan(target_spacing=(1.0, 2.0), clip=None, mean=0.0, std=1.0)
    out, out_label = preprocess_case(
        tf.constant(image), tf.constant(label), tf.constant([1.0, 1.0]), plan, min_shape=(8, 4)
    )
    assert out.shape == (8, 4, 2) and out_label.shape == (8, 4)
    resampled = resample(tf.constant(image), (5, 4)).numpy()
    np.testing.assert_allclose(out.numpy()[1:6], resampled, atol=1e-6)
    assert np.all(out.numpy()[[0, 6, 7]] == 0) and np.all(out_label.numpy()[[0, 6, 7]] == 0)


def test_one_hot_matches_numpy_eye():
    label = np.random.default_rng(12).integers(0, 4, size=(3, 4, 5))
    np.testing.assert_array_equal(one_hot(tf.constant(label), 4).numpy(), np.eye(4)[label])


def test_preprocess_case_runs_in_tf_data_with_unknown_shapes():
    rng = np.random.default_rng(13)
    image = rng.normal(size=(6, 9, 10)).astype(np.float32)
    label = rng.integers(0, 3, size=image.shape).astype(np.int32)
    plan = PreprocessPlan(target_spacing=(1.0, 1.0, 1.0), clip=None, mean=None, std=None)
    spacing = np.array([4.0, 1.5, 1.0])

    def gen():
        yield image, label, spacing

    sig = (
        tf.TensorSpec([None, None, None], tf.float32),
        tf.TensorSpec([None, None, None], tf.int32),
        tf.TensorSpec([3], tf.float64),
    )
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    got = next(iter(ds.map(lambda im, lab, sp: preprocess_case(im, lab, sp, plan))))
    eager = preprocess_case(tf.constant(image), tf.constant(label), tf.constant(spacing), plan)
    assert got[0].shape == (24, 14, 10, 1)
    np.testing.assert_allclose(got[0].numpy(), eager[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(got[1].numpy(), eager[1].numpy())


# -- the resampled grid's bound -------------------------------------------------------------


def test_resampling_check_refuses_absurd_grids_with_their_figures():
    from medseg.pipeline.preprocess import MAX_RESAMPLED_VOXELS, check_resampling

    # 40 mm (and 10 mm) voxels resampled to 0.25 mm: 640 x 2560 x 2560 voxels, 17 GB as
    # float32 (no allocation here: only the check runs)
    with pytest.raises(ValueError) as info:
        check_resampling((4, 64, 64), (40.0, 10.0, 10.0), (0.25, 0.25, 0.25), case_id="ct_7")
    voxels = 640 * 2560 * 2560
    assert voxels > MAX_RESAMPLED_VOXELS
    assert str(info.value) == (
        "ct_7: resampling from shape (4, 64, 64) at spacing (40.0, 10.0, 10.0) mm to the "
        f"target spacing (0.25, 0.25, 0.25) mm gives shape (640, 2560, 2560) = {voxels:,} "
        f"voxels, above the bound of {MAX_RESAMPLED_VOXELS:,} (max_voxels); check the "
        "file's voxel spacing (a spacing in cm instead of mm?) or, for a truly larger scan, "
        "raise max_voxels"
    )
    # the bound is inclusive: 4**3 voxels pass a bound of 64, not one of 63
    assert check_resampling((4, 4, 4), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), max_voxels=64) is None
    with pytest.raises(ValueError, match=r"= 64 voxels, above the bound of 63"):
        check_resampling((4, 4, 4), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), max_voxels=63)
    # an axis of 30 voxels of 0.01 mm at 1 mm: 0.3 voxel, which the shape rule clamps to 1
    np.testing.assert_array_equal(resampled_shape([30, 8, 8], [0.01, 1, 1], (1, 1, 1)), [1, 8, 8])
    with pytest.raises(ValueError, match=r"would collapse axis 0 \(30 voxels\) to less than one "
                       r"voxel \(shape \(0, 8, 8\)\)"):
        check_resampling((30, 8, 8), (0.01, 1.0, 1.0), (1.0, 1.0, 1.0))
    # a single slice stays a single slice: nothing collapses
    assert check_resampling((1, 8, 8), (1.0, 1.0, 1.0), (5.0, 1.0, 1.0)) is None
    for spacing in [(0.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (np.nan, 1.0, 1.0), (np.inf, 1.0, 1.0)]:
        with pytest.raises(ValueError, match="the spacing must be positive and finite"):
            check_resampling((4, 4, 4), spacing, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="max_voxels=0 must be at least 1"):
        check_resampling((4, 4, 4), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), max_voxels=0)


def test_preprocess_case_refuses_a_large_resampling_eagerly_and_in_tf_data():
    image = np.ones((5, 8, 8), np.float32)
    label = np.zeros((5, 8, 8), np.int32)
    plan = PreprocessPlan(target_spacing=(1.0, 1.0, 1.0), clip=None, mean=None, std=None)
    spacing = np.array([4.0, 1.0, 1.0])  # -> (20, 8, 8) = 1280 voxels
    assert preprocess_case(image, label, spacing, plan, max_voxels=1280)[0].shape == (20, 8, 8, 1)
    with pytest.raises(ValueError, match=r"^case_3: resampling from shape \(5, 8, 8\) .* gives "
                       r"shape \(20, 8, 8\) = 1,280 voxels, above the bound of 1,000"):
        preprocess_case(image, label, spacing, plan, max_voxels=1000, case_id="case_3")
    # in a tf.data pipeline (training), the same figures when the graph runs
    ds = tf.data.Dataset.from_tensors((image, label, spacing, "case_3"))
    ds = ds.map(lambda im, lab, sp, cid: preprocess_case(im, lab, sp, plan, max_voxels=1000,
                                                          case_id=cid))
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        next(iter(ds))
    message = info.value.message
    for fragment in ["[case_3]", "[5 8 8]", "[4 1 1]", "[20 8 8]", "[1280]", "at most 1000 voxels"]:
        assert fragment in message
