"""Preprocessing ops against numpy/scipy references."""

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
    with pytest.raises(ValueError, match="normalize='minmax'"):
        plan_preprocessing(PreprocessConfig(normalize="minmax"), FINGERPRINT)


def test_normalize_clips_then_zscores():
    image = np.array([-1000.0, -50.0, 100.0, 250.0, 3000.0], np.float32)
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
    plan = PreprocessPlan(target_spacing=(3.0, 2.0, 2.0), clip=None, mean=0.0, std=1.0)
    out_image, out_label = preprocess_case(
        tf.constant(image), tf.constant(label), tf.constant([4.5, 1.0, 1.0]), plan
    )
    assert out_image.shape == (9, 10, 10, 1) and out_label.shape == (9, 10, 10)
    grid = _centre_coords((9, 10, 10), image.shape)
    ref = map_coordinates(image.astype(np.float32), grid, order=1, mode="nearest")
    np.testing.assert_allclose(out_image.numpy()[..., 0], ref, atol=1e-3)
    assert set(np.unique(out_label.numpy())) <= {0, 1}
