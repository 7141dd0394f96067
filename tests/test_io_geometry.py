"""medseg.io geometry helpers against hand-built affines."""

import numpy as np
import pytest

from medseg.io import MedsegIOError, kits19_affine, spacing_from_affine
from medseg.io.geometry import SPACING_RANGE_MM, check_geometry, spacing_range


def test_kits19_affine_layout():
    affine = kits19_affine((3.0, 0.78, 0.78))
    expected = np.array(
        [[0, 0, -0.78, 0], [0, -0.78, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
    )
    np.testing.assert_array_equal(affine, expected)
    assert affine.dtype == np.float64


def test_spacing_from_kits19_affine_is_in_array_axis_order():
    spacing = (2.5, 0.6, 0.9)  # distinct per axis, so a column/row mix-up would show
    np.testing.assert_allclose(spacing_from_affine(kits19_affine(spacing)), spacing)


def test_spacing_from_ras_diagonal_affine():
    affine = np.diag([0.7, 0.8, 5.0, 1.0])
    affine[:3, 3] = (-100.0, 20.0, 35.0)  # the origin does not matter
    np.testing.assert_allclose(spacing_from_affine(affine), [0.7, 0.8, 5.0])


def test_spacing_from_rotated_affine():
    angle = np.deg2rad(30.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.5, 1.5, 4.0])
    affine[:3, 3] = (10.0, -4.0, 2.0)
    spacing = spacing_from_affine(affine)
    np.testing.assert_allclose(spacing, [0.5, 1.5, 4.0])
    assert not np.allclose(np.abs(np.diag(affine[:3, :3])), [0.5, 1.5, 4.0])


def test_kits19_affine_rejects_wrong_length():
    with pytest.raises(ValueError, match="3 spacings"):
        kits19_affine((1.0, 2.0))


# --- check_geometry: plausible spacing and a non-singular affine ------------------------


@pytest.mark.parametrize(
    "spacing",
    [(0.3, 0.3, 0.3), (5.0, 0.7, 0.7), (10.0, 0.98, 0.98), (0.01, 0.5, 20.0)],
    ids=["micro-0.3mm", "ct-5mm", "ct-10mm", "range-ends"],
)
def test_plausible_scans_pass_and_return_their_spacing(spacing):
    affine = kits19_affine(spacing)
    np.testing.assert_allclose(check_geometry(affine, where="x.nii"), spacing)


def test_gantry_tilt_shear_passes():
    # A tilted CT: the slice axis is not orthogonal to the image plane, but not singular.
    affine = np.eye(4)
    affine[:3, :3] = [[0.7, 0.0, 0.0], [0.0, 0.7, 1.3], [0.0, 0.0, 2.5]]
    np.testing.assert_allclose(
        check_geometry(affine, where="tilt.nii"), np.linalg.norm(affine[:3, :3], axis=0)
    )


@pytest.mark.parametrize("bad", [1e-6, 0.0, 40.0])
def test_implausible_spacing_names_file_value_range_and_fix(bad):
    with pytest.raises(MedsegIOError) as err:
        check_geometry(kits19_affine((bad, 1.0, 1.0)), where="scan.nii.gz")
    message = str(err.value)
    assert message.startswith("scan.nii.gz: implausible voxel spacing")
    assert f"{[bad, 1.0, 1.0]} mm (axis 0)" in message
    assert "allowed 0.01..20 mm" in message and "MEDSEG_SPACING_RANGE_MM" in message


def test_spacing_range_argument_and_environment(monkeypatch):
    thick = kits19_affine((40.0, 1.0, 1.0))
    np.testing.assert_allclose(
        check_geometry(thick, where="x", spacing_range_mm=(0.5, 50)), (40.0, 1.0, 1.0)
    )
    monkeypatch.setenv("MEDSEG_SPACING_RANGE_MM", "0.5, 50")
    assert spacing_range() == (0.5, 50.0)
    check_geometry(thick, where="x")
    # an explicit argument wins over the environment
    with pytest.raises(MedsegIOError, match="allowed 0.01..20 mm"):
        check_geometry(thick, where="x", spacing_range_mm=SPACING_RANGE_MM)
    for text in ("50", "a,b", "2,1", "0,1", "nan,1"):
        monkeypatch.setenv("MEDSEG_SPACING_RANGE_MM", text)
        with pytest.raises(ValueError, match=r"MEDSEG_SPACING_RANGE_MM=.*LOW,HIGH"):
            spacing_range()


def test_nan_and_singular_affines_are_refused():
    nan = kits19_affine((3.0, 1.0, 1.0))
    nan[1, 1] = np.nan
    with pytest.raises(MedsegIOError, match=r"^a\.nii: affine holds NaN or inf"):
        check_geometry(nan, where="a.nii")
    flat = np.eye(4)
    flat[:3, 1] = (1.0, 0.0, 0.0)  # axis 1 runs along axis 0: voxels overlap
    assert np.linalg.matrix_rank(flat[:3, :3]) == 2
    with pytest.raises(MedsegIOError, match=r"^b\.nii: singular affine"):
        check_geometry(flat, where="b.nii")
