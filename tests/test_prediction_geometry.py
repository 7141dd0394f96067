"""Predictions written to NIfTI overlay their source image in world coordinates."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.inference import PredictionPlan, predict_files
from medseg.io import kits19_affine
from medseg.pipeline import PreprocessPlan

SHAPE = (12, 22, 18)


def phantom_labels() -> np.ndarray:
    """Two asymmetric structures: no flip or transpose of the grid maps it onto itself."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 3:12, 2:7] = 1
    grid = np.indices(SHAPE)
    centre = np.array([8, 15, 12])[:, None, None, None]
    labels[(((grid - centre) / np.array([3, 4, 4])[:, None, None, None]) ** 2).sum(0) <= 1] = 2
    return labels


def identity_model(batch):
    """One-hot of the nearest class to the (normalised) intensity: label * 100 / 100."""
    x = np.asarray(batch)[..., :1]
    logits = -8.0 * (x - np.arange(3, dtype=np.float32)) ** 2
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


def rotation(degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def lps_affine() -> np.ndarray:
    """Array axes running right-to-left, anterior-to-posterior, inferior-to-superior."""
    affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    affine[:3, 3] = (40.0, 30.0, -120.0)
    return affine


def ras_affine() -> np.ndarray:
    """Array axes along R, A, S, slightly rotated in-plane, with an origin offset."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(10) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (-60.0, 15.0, 200.0)
    return affine


AFFINES = {
    "kits19": kits19_affine((2.5, 0.8, 0.9)),
    "lps": lps_affine(),
    "ras": ras_affine(),
}


def world_lookup(source_labels, source_affine, pred_affine, pred_shape):
    """The source label at the world position of every predicted voxel's centre."""
    ijk = np.indices(pred_shape).reshape(3, -1)
    world = pred_affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    source_ijk = np.rint(np.linalg.inv(source_affine) @ world)[:3].astype(int)
    inside = np.all((source_ijk >= 0) & (source_ijk < np.array(SHAPE)[:, None]), axis=0)
    assert inside.all()
    return source_labels[tuple(source_ijk)].reshape(pred_shape)


@pytest.mark.parametrize("orientation", sorted(AFFINES))
@pytest.mark.parametrize("target_spacing", [None, (1.5, 1.2, 1.2)])
def test_prediction_overlays_its_source_in_world_coordinates(
    tmp_path, orientation, target_spacing
):
    labels = phantom_labels()
    affine = AFFINES[orientation]
    image = labels.astype(np.int16) * 100
    source = tmp_path / "in" / f"{orientation}.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(image, affine), source)
    plan = PredictionPlan(
        PreprocessPlan(target_spacing=target_spacing, clip=None, mean=0.0, std=100.0),
        ("background", "kidney", "tumour"),
        (8, 8, 8),
        stride=4,
    )
    written = predict_files(identity_model, plan, [source], tmp_path / "out", log=None)
    assert [p.name for p in written] == [f"{orientation}_seg.nii.gz"]

    pred_img = nib.load(written[0])
    src_img = nib.load(source)
    pred = np.asarray(pred_img.dataobj)
    assert pred.shape == SHAPE and pred.dtype == np.uint8
    assert nib.aff2axcodes(pred_img.affine) == nib.aff2axcodes(affine)
    np.testing.assert_allclose(pred_img.affine, src_img.affine, atol=1e-4)
    assert int(pred_img.header["sform_code"]) == int(src_img.header["sform_code"])
    assert int(pred_img.header["qform_code"]) == int(src_img.header["qform_code"])

    looked_up = world_lookup(labels, src_img.affine, pred_img.affine, pred.shape)
    if target_spacing is None:
        np.testing.assert_array_equal(pred, looked_up)
    else:
        # resampled there and back: labels agree wherever a voxel's neighbours agree
        uniform = ndimage.maximum_filter(labels, 3) == ndimage.minimum_filter(labels, 3)
        np.testing.assert_array_equal(pred[uniform], looked_up[uniform])
        assert np.mean(pred == looked_up) > 0.9
    # both images brought to RAS by nibabel overlay too, voxel for voxel
    canonical_pred = np.asarray(nib.as_closest_canonical(pred_img).dataobj)
    canonical_src = np.asarray(nib.as_closest_canonical(src_img).dataobj) // 100
    if target_spacing is None:
        np.testing.assert_array_equal(canonical_pred, canonical_src)
    # the check can fail: the prediction flipped along any axis no longer overlays
    for axis in range(3):
        assert not np.array_equal(np.flip(pred, axis), looked_up)


def test_prediction_refuses_an_absurd_resampling_before_calling_the_model():
    from medseg.inference import predict_case
    from medseg.pipeline.geometry import prepare_case

    image = np.zeros((6, 10, 10), np.int16)
    plan = PreprocessPlan(target_spacing=(0.5, 1.0, 1.0), clip=None, mean=0.0, std=1.0)
    calls = []

    def model(batch):
        calls.append(len(batch))
        return identity_model(batch)

    # 6 slices of 5 mm at 0.5 mm: (60, 10, 10) = 6000 voxels
    prepared, _ = prepare_case(image, (5.0, 1.0, 1.0), plan, max_voxels=6000)
    assert prepared.shape == (60, 10, 10, 1)
    with pytest.raises(ValueError, match=r"^scan\.nii\.gz: resampling from shape \(6, 10, 10\) "
                       r"at spacing \(5\.0, 1\.0, 1\.0\) mm to the target spacing \(0\.5, 1\.0, "
                       r"1\.0\) mm gives shape \(60, 10, 10\) = 6,000 voxels, above the bound "
                       r"of 5,999"):
        predict_case(model, image, (5.0, 1.0, 1.0), plan, (8, 8, 8), 3, max_voxels=5999,
                     name="scan.nii.gz")
    with pytest.raises(ValueError, match=r"scan\.nii\.gz: .* would collapse axis 0 \(6 voxels\)"):
        predict_case(model, image, (0.01, 1.0, 1.0), plan, (8, 8, 8), 3, name="scan.nii.gz")
    with pytest.raises(ValueError, match=r"scan\.nii\.gz: spacing must be 3 numbers"):
        predict_case(model, image, (1.0, 1.0), plan, (8, 8, 8), 3, name="scan.nii.gz")
    assert calls == []
