"""The kits_phantom CT phantom: determinism, geometry and Hounsfield units per label."""

import numpy as np
import pytest
from medseg_datasets.kits_phantom.phantom import HU, PhantomSpec, make_case
from scipy import ndimage

SPEC = PhantomSpec(inplane=64, z_extent_mm=(60.0, 80.0))
SEEDS = range(30)


@pytest.fixture(scope="module")
def cases():
    return [make_case((7, seed), SPEC) for seed in SEEDS]


def test_same_seed_same_case_different_seed_different_case():
    image, label, spacing = make_case(3, SPEC)
    again = make_case(3, SPEC)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])
    assert spacing == again[2]
    other = make_case(4, SPEC)
    assert image.shape != other[0].shape or not np.array_equal(image, other[0])
    assert spacing != other[2]


def test_dtypes_shapes_and_label_values(cases):
    for image, label, _ in cases:
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape and image.shape[1:] == (64, 64)
        assert set(np.unique(label).tolist()) <= {0, 1, 2}
        assert (label == 1).any()  # both kidneys are always in the scan


def test_spacing_and_slice_count_ranges(cases):
    slice_counts = set()
    for image, _, (slice_mm, row_mm, col_mm) in cases:
        assert 2.5 <= slice_mm <= 5.0
        assert 0.6 <= row_mm <= 0.9 and row_mm == col_mm
        # slices = scan length / slice spacing, the length drawn from z_extent_mm
        assert 60.0 - slice_mm <= image.shape[0] * slice_mm <= 80.0 + slice_mm
        slice_counts.add(image.shape[0])
    assert len(slice_counts) > 5


def test_any_matrix_size_works():
    image, label, _ = make_case(0, PhantomSpec(inplane=96, z_extent_mm=(20.0, 20.0)))
    assert image.shape[1:] == (96, 96) and (label == 1).any()


def test_hounsfield_units_per_label(cases):
    kidney = np.concatenate([image[label == 1] for image, label, _ in cases]).astype(float)
    tumour = np.concatenate([image[label == 2] for image, label, _ in cases]).astype(float)
    assert kidney.mean() == pytest.approx(HU["kidney"], abs=3)
    assert kidney.std() == pytest.approx(15, abs=3)  # noise only
    assert tumour.mean() == pytest.approx(HU["tumour"], abs=10)
    assert tumour.std() > 20  # its texture adds to the noise
    for image, label, _ in cases:
        # air outside the body
        assert image[label == 0].min() < -900
        assert np.median(image[:, 0, 0]) == pytest.approx(-1000, abs=10)


def test_bone_is_posterior_centre(cases):
    for image, label, _ in cases:
        bone = (label == 0) & (image > 450)  # nothing but bone is this bright
        assert bone.sum() > 0
        assert image[bone].mean() == pytest.approx(HU["bone"], abs=10)
        _, rows, cols = np.nonzero(bone)
        assert rows.mean() > 0.6 * 64  # posterior (rows run anterior -> posterior)
        assert abs(cols.mean() - 32) < 0.1 * 64


def test_kidneys_left_and_right_of_the_spine(cases):
    for _, label, _ in cases:
        cols = np.nonzero((label > 0).any(axis=(0, 1)))[0]
        assert cols.min() < 32 < cols.max()
        assert not (label[:, :, 30:34] > 0).any()  # the spine lies between them


def test_some_cases_have_no_tumour(cases):
    with_tumour = [bool((label == 2).any()) for _, label, _ in cases]
    assert 0.5 < np.mean(with_tumour) < 0.97


def test_tumours_lie_mostly_inside_a_kidney(cases):
    for _, label, _ in cases:
        tumour = label == 2
        if not tumour.any():
            continue
        shell = ndimage.binary_dilation(tumour) & ~tumour
        # most of a tumour's surroundings is kidney; some bulge out of it
        assert np.mean(label[shell] == 1) > 0.5


def test_spec_validation():
    with pytest.raises(ValueError, match="slice_spacing_mm"):
        PhantomSpec(slice_spacing_mm=(5.0, 2.5))
    with pytest.raises(ValueError, match="tumour_probability"):
        PhantomSpec(tumour_probability=1.5)
