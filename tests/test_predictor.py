"""Whole-case prediction returns to the source grid."""

import numpy as np

from medseg.inference import predict_case
from medseg.pipeline import PreprocessPlan


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
