"""2D slab models (``patch.mode="slice"``) predict whole volumes: one slab per slice."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from medseg.inference import PredictionPlan, predict_case, predict_files
from medseg.inference.predictor import slabs
from medseg.pipeline import PreprocessPlan

RAW = PreprocessPlan(target_spacing=None, clip=None, mean=0.0, std=1.0)


def reference_slabs(volume, k):
    """numpy: mirror k//2 slices at each end, then (H, W, k*C) slice-major per slice."""
    half = k // 2
    padded = np.pad(volume, [(half, half), (0, 0), (0, 0), (0, 0)], mode="symmetric")
    return [
        padded[z : z + k].transpose(1, 2, 0, 3).reshape(*volume.shape[1:3], -1)
        for z in range(volume.shape[0])
    ]


def test_slabs_match_numpy():
    volume = np.random.default_rng(0).normal(size=(5, 4, 6, 2)).astype(np.float32)
    for k in (1, 3, 5):
        got = [s.numpy() for s in slabs(tf.constant(volume), k)]
        for a, b in zip(got, reference_slabs(volume, k), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="odd number of slices"):
        next(slabs(tf.constant(volume), 2))


def previous_slice_model(k):
    """A 2D 'model' labelling kidney where the slab's slice above the centre is positive."""

    def predict(batch):
        above = np.asarray(batch)[..., k // 2 - 1]  # one channel per slice (C = 1)
        kidney = (above > 0).astype(np.float32)
        return np.stack([1 - kidney, kidney], axis=-1)

    return predict


def test_every_slice_is_predicted_from_its_own_slab():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(6, 8, 10)).astype(np.float32)
    labels, _ = predict_case(
        previous_slice_model(3), image, (2.0, 1.0, 1.0), RAW, (3, 8, 8), 2, slab=3,
        weighting="mean", probabilities=False,
    )
    # slice z's label is the sign of slice z-1; slice 0 mirrors itself as its neighbour
    expected = np.concatenate([image[:1], image[:-1]]) > 0
    np.testing.assert_array_equal(labels, expected)
    with pytest.raises(ValueError, match=r"training patch size \(k, H, W\) with k = 3"):
        predict_case(previous_slice_model(3), image, (2.0, 1.0, 1.0), RAW, (5, 8, 8), slab=3)


@pytest.mark.slow
def test_a_trained_slab_model_segments_a_volume_on_its_grid(tiny_config, tmp_path):
    from medseg.pipeline import read_cases
    from medseg.workflows import run_experiment

    config = tiny_config(**{"patch.mode": "slice", "patch.patch_size": [3, 16, 16]})
    result = run_experiment(config)
    assert result.model.input_shape[-1] == 3  # 3 slices of 1 channel, as 2D channels
    # its validation cases were predicted whole through the slab path and scored
    assert result.cases and all(np.isfinite(c.scores["dice_kidney"]) for c in result.cases)
    plan = PredictionPlan.from_config(config, result.data.plan, result.data.class_names, stride=2)
    assert plan.slab == 3
    plan.save(tmp_path / "plan.json")
    assert PredictionPlan.from_file(tmp_path / "plan.json") == plan
    ex = next(read_cases(result.data.builder, "train", result.data.val_ids[:1]).as_numpy_iterator())
    affine = np.diag([*ex["spacing"], 1.0])
    affine[:3, 3] = (5.0, -3.0, 2.0)
    nib.save(nib.Nifti1Image(ex["image"], affine), tmp_path / "case.nii.gz")
    (written,) = predict_files(
        result.model, PredictionPlan.from_file(tmp_path / "plan.json"),
        [tmp_path / "case.nii.gz"], tmp_path / "out", log=None,
    )
    out = nib.load(written)
    assert out.shape == ex["image"].shape
    np.testing.assert_allclose(out.affine, affine)
    labels, _ = predict_case(
        result.model, ex["image"], ex["spacing"], result.data.plan, (3, 16, 16), 3,
        stride=2, slab=3, probabilities=False,
    )
    np.testing.assert_array_equal(np.asarray(out.dataobj), labels)
    # a 3D plan for this 2D model is refused, naming the channels
    from medseg.io import MedsegIOError

    with pytest.raises(MedsegIOError, match="takes 3"):
        predict_files(result.model, dataclasses.replace(plan, slab=None),
                      [tmp_path / "case.nii.gz"], tmp_path / "bad", log=None)
