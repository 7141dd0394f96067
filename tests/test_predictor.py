"""Whole-case prediction returns to the source grid."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from medseg.inference import predict_case, resample_chunks, to_source_grid
from medseg.pipeline import PreprocessPlan
from medseg.pipeline.preprocess import resample


def _threshold_model(batch):
    """Class 1 where the (normalized) intensity is positive: a voxel-wise 'model'."""
    x = np.asarray(batch)[..., 0]
    p1 = 1.0 / (1.0 + np.exp(-20.0 * x))
    return np.stack([1.0 - p1, p1], axis=-1).astype(np.float32)


def test_prediction_is_on_the_original_grid_and_matches_a_voxelwise_reference():
    rng = np.random.default_rng(0)
    image = np.full((9, 30, 26), -100.0, np.float32)
    image[2:7, 8:22, 5:20] = 100.0  # a bright box, several voxels from every edge
    image += rng.normal(0, 1, image.shape).astype(np.float32)
    plan = PreprocessPlan(target_spacing=(3.0, 1.5, 1.5), clip=None, mean=0.0, std=100.0)
    labels, probs = predict_case(
        _threshold_model, image, (2.0, 1.0, 1.0), plan, patch_size=(4, 8, 8), num_classes=2
    )
    assert labels.shape == image.shape and probs.shape == (*image.shape, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    truth = (image > 0).astype(np.uint8)
    # resampling blurs only the box's boundary: every voxel one away from it is exact
    core = np.zeros_like(truth, bool)
    core[3:6, 9:21, 6:19] = True
    outside = np.ones_like(truth, bool)
    outside[1:8, 7:23, 4:21] = False
    assert np.all(labels[core] == 1) and np.all(labels[outside] == 0)
    assert np.mean(labels == truth) > 0.95


def _box_case():
    rng = np.random.default_rng(1)
    image = np.full((9, 30, 26), -100.0, np.float32)
    image[2:7, 8:22, 5:20] = 100.0
    image += rng.normal(0, 1, image.shape).astype(np.float32)
    plan = PreprocessPlan(target_spacing=(3.0, 1.5, 1.5), clip=None, mean=0.0, std=100.0)
    return image, plan


def _soft_model(sharpness):
    def model(batch):
        p1 = 1.0 / (1.0 + np.exp(-sharpness * np.asarray(batch)[..., 0]))
        return np.stack([1.0 - p1, p1], axis=-1).astype(np.float32)

    return model


def test_labels_alone_equal_the_argmax_of_the_probabilities():
    image, plan = _box_case()
    labels, probs = predict_case(_threshold_model, image, (2.0, 1.0, 1.0), plan, (4, 8, 8))
    only, none = predict_case(
        _threshold_model, image, (2.0, 1.0, 1.0), plan, (4, 8, 8), probabilities=False
    )
    assert none is None
    np.testing.assert_array_equal(only, labels)
    np.testing.assert_array_equal(labels, np.argmax(probs, axis=-1))


def test_ensemble_averages_the_probabilities_of_its_models():
    image, plan = _box_case()
    a, b = _soft_model(1.0), _soft_model(4.0)

    def mean_model(batch):
        return (a(batch) + b(batch)) / 2

    _, ensemble = predict_case([a, b], image, (2.0, 1.0, 1.0), plan, (4, 8, 8), 2)
    _, reference = predict_case(mean_model, image, (2.0, 1.0, 1.0), plan, (4, 8, 8), 2)
    _, single = predict_case(a, image, (2.0, 1.0, 1.0), plan, (4, 8, 8), 2)
    np.testing.assert_allclose(ensemble, reference, atol=1e-6)
    assert not np.allclose(ensemble, single, atol=1e-3)


def test_number_of_classes_is_checked():
    image, plan = _box_case()
    with pytest.raises(ValueError, match="expected"):
        predict_case(_threshold_model, image, (2.0, 1.0, 1.0), plan, (4, 8, 8), num_classes=3)


@pytest.mark.parametrize(
    ("source", "target"),
    [((7, 9, 11), (20, 15, 8)), ((20, 8, 8), (7, 8, 8)), ((5, 6, 7), (5, 13, 3)), ((1, 4, 4), (3, 4, 4))],
)
@pytest.mark.parametrize("slices", [1, 4, 64])
def test_slab_resampling_equals_whole_volume_resampling(source, target, slices):
    volume = tf.constant(np.random.default_rng(2).normal(size=(*source, 3)).astype(np.float32))
    whole = resample(volume, target, "linear").numpy()
    starts, slabs = zip(*resample_chunks(volume, target, slices=slices), strict=True)
    assert list(starts) == list(range(0, target[0], slices))
    # equal up to float rounding (the in-plane resize may vectorise a slab differently)
    np.testing.assert_allclose(np.concatenate([s.numpy() for s in slabs]), whole, atol=1e-5)
    labels, probs = to_source_grid(volume, target)
    np.testing.assert_allclose(probs, whole, atol=1e-5)
    margin = np.diff(np.sort(whole, axis=-1)[..., -2:], axis=-1)[..., 0]
    clear = margin > 1e-4  # argmax ties within rounding may go either way
    np.testing.assert_array_equal(labels[clear], np.argmax(whole, axis=-1)[clear])


def test_slab_resampling_matches_scipy_linear_interpolation():
    # resample's convention: output o reads input (o + 0.5) * in / out - 0.5, edge-clamped
    source, target = (6, 5, 7), (13, 9, 4)
    volume = np.random.default_rng(3).normal(size=(*source, 1)).astype(np.float32)
    coords = [
        np.clip((np.arange(t) + 0.5) * s / t - 0.5, 0, s - 1)
        for s, t in zip(source, target, strict=True)
    ]
    grid = np.meshgrid(*coords, indexing="ij")
    expected = ndimage.map_coordinates(volume[..., 0], grid, order=1, mode="nearest")
    _, probs = to_source_grid(tf.constant(volume), target)
    np.testing.assert_allclose(probs[..., 0], expected, atol=1e-5)


@pytest.mark.parametrize("nearest_axis", [0, 1, 2])
def test_slab_resampling_keeps_the_anisotropic_axis_nearest(nearest_axis):
    source, target = (5, 9, 6), (12, 7, 13)
    volume = tf.constant(np.random.default_rng(4).normal(size=(*source, 2)).astype(np.float32))
    whole = resample(volume, target, "linear", nearest_axis=nearest_axis).numpy()
    slabs = [s.numpy() for _, s in resample_chunks(volume, target, 5, nearest_axis)]
    np.testing.assert_allclose(np.concatenate(slabs), whole, atol=1e-6)
    linear = resample(volume, target, "linear").numpy()
    assert not np.allclose(whole, linear, atol=1e-3)


def test_crop_to_nonzero_is_undone():
    # CT-like: a body (non-zero) inside a zero frame, a bright box inside the body
    image = np.zeros((10, 24, 20), np.float32)
    image[2:9, 3:21, 4:17] = -100.0
    image[4:7, 8:15, 7:13] = 100.0
    cropped = PreprocessPlan(None, None, 0.0, 100.0, crop_to_nonzero=True)
    whole = PreprocessPlan(None, None, 0.0, 100.0)
    seen = []

    def model(batch):
        seen.append(np.abs(batch).min())
        return _threshold_model(batch)

    labels, probs = predict_case(model, image, (2.0, 1.0, 1.0), cropped, (4, 8, 8))
    assert min(seen) == 1.0  # the model saw the body (-1) and box (1), never the zero frame
    assert labels.shape == image.shape and probs.shape == (*image.shape, 2)
    np.testing.assert_array_equal(labels, (image > 0).astype(np.uint8))
    frame = np.ones(image.shape, bool)
    frame[2:9, 3:21, 4:17] = False
    np.testing.assert_array_equal(probs[frame], np.array([[1.0, 0.0]] * frame.sum()))
    reference, _ = predict_case(_threshold_model, image, (2.0, 1.0, 1.0), whole, (4, 8, 8))
    np.testing.assert_array_equal(labels, reference)
