"""medseg.io geometry helpers against hand-built affines."""

import numpy as np
import pytest

from medseg.io import kits19_affine, spacing_from_affine


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
