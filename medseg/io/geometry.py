"""Geometry helpers shared by datasets, preprocessing and export.

Volumes are kept in array-axis order; an affine maps voxel indices ``(i, j, k, 1)`` to
world millimetres, so spacing is read from it column by column.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from medseg.io.errors import MedsegIOError

__all__ = ["SPACING_RANGE_MM", "check_geometry", "kits19_affine", "spacing_from_affine"]

# Plausible voxel spacing in mm. 0.01 mm admits preclinical micro-CT (10 µm and up) and
# 0.3 mm small-animal scans; 20 mm admits the thickest clinical slices (5-10 mm CT, MR
# with gaps, 15 mm scout series) with margin. Outside it the header is almost surely
# corrupt (a spacing read in metres, or a 0/1e-6 placeholder) and resampling to the
# target spacing would allocate absurd grids.
SPACING_RANGE_MM = (0.01, 20.0)
# "LOW,HIGH" in mm; overrides SPACING_RANGE_MM where no spacing_range_mm= is passed.
SPACING_RANGE_ENV = "MEDSEG_SPACING_RANGE_MM"


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing of an affine, in array-axis order.

    Parameters
    ----------
    affine : np.ndarray
        ``(4, 4)`` (or ``(3, 3)`` / ``(3, 4)``) voxel-to-world matrix.

    Returns
    -------
    np.ndarray
        ``(3,)`` float64: the norm of each of the first three columns of
        ``affine[:3, :3]``, i.e. the step in millimetres along array axes 0, 1, 2.
        Rotations, flips and axis permutations do not change it.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 3 or matrix.shape[1] < 3:
        raise ValueError(f"expected a (4, 4) affine, got shape {matrix.shape}")
    return np.linalg.norm(matrix[:3, :3], axis=0)


def kits19_affine(spacing: Sequence[float]) -> np.ndarray:
    """The affine KiTS19 stores with its volumes, for arrays in (slices, rows, cols) order.

    KiTS19's NIfTI files hold arrays as (slices, rows, cols) with an anti-diagonal affine
    and zero origin: ``[[0, 0, -col, 0], [0, -row, 0, 0], [-slice, 0, 0, 0], [0, 0, 0, 1]]``.

    Parameters
    ----------
    spacing : sequence of float
        ``(slice, row, col)`` spacing in millimetres, in array-axis order.

    Returns
    -------
    np.ndarray
        ``(4, 4)`` float64 affine; ``spacing_from_affine`` of it returns ``spacing``.
    """
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.shape != (3,):
        raise ValueError(f"expected 3 spacings (slice, row, col), got {values.tolist()}")
    slice_mm, row_mm, col_mm = (float(v) for v in values)
    return np.array(
        [
            [0.0, 0.0, -col_mm, 0.0],
            [0.0, -row_mm, 0.0, 0.0],
            [-slice_mm, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=np.float64,
    )


def spacing_range(spacing_range_mm: tuple[float, float] | None = None) -> tuple[float, float]:
    """The allowed ``(low, high)`` spacing in mm.

    Parameters
    ----------
    spacing_range_mm : tuple of float, optional
        Explicit range; else the ``MEDSEG_SPACING_RANGE_MM`` environment variable
        (``"LOW,HIGH"``), else :data:`SPACING_RANGE_MM`.

    Returns
    -------
    tuple of float
        ``(low, high)`` with ``0 < low <= high``, both finite.
    """
    source = "spacing_range_mm"
    if spacing_range_mm is None:
        text = os.environ.get(SPACING_RANGE_ENV, "").strip()
        if not text:
            return SPACING_RANGE_MM
        source = f"environment variable {SPACING_RANGE_ENV}={text!r}"
        try:
            spacing_range_mm = tuple(float(v) for v in text.split(","))
        except ValueError:
            spacing_range_mm = ()
    values = tuple(spacing_range_mm)
    if (
        len(values) != 2
        or not all(math.isfinite(v) for v in values)
        or not 0 < values[0] <= values[1]
    ):
        raise ValueError(
            f"{source}: expected two finite millimetre values LOW,HIGH with 0 < LOW <= HIGH, "
            f"e.g. {SPACING_RANGE_MM[0]},{SPACING_RANGE_MM[1]}"
        )
    return float(values[0]), float(values[1])


def check_geometry(
    affine: np.ndarray, *, where: str, spacing_range_mm: tuple[float, float] | None = None
) -> np.ndarray:
    """Refuse an affine no scan can have, before any voxel data is read.

    Parameters
    ----------
    affine : np.ndarray
        ``(4, 4)`` voxel-to-world matrix.
    where : str
        The file (and case) it came from, prefixed to the error message.
    spacing_range_mm : tuple of float, optional
        Allowed ``(low, high)`` spacing, see :func:`spacing_range`.

    Returns
    -------
    np.ndarray
        ``(3,)`` spacing in mm along array axes 0, 1, 2.

    Raises
    ------
    MedsegIOError
        The 3x3 part is not finite or is singular (axes collapsed onto a plane), or a
        spacing lies outside the range.
    """

    matrix = np.asarray(affine, dtype=np.float64)
    linear = matrix[:3, :3]
    if not np.all(np.isfinite(linear)):
        raise MedsegIOError(
            f"{where}: affine holds NaN or inf:\n{linear}\nthe header's geometry is corrupt"
        )
    low, high = spacing_range(spacing_range_mm)
    spacing = spacing_from_affine(matrix)
    how = (
        f"allowed {low:g}..{high:g} mm (pass spacing_range_mm= or set "
        f"{SPACING_RANGE_ENV}=LOW,HIGH to change it)"
    )
    outside = (spacing < low) | (spacing > high)
    if np.any(outside):
        raise MedsegIOError(
            f"{where}: implausible voxel spacing {[float(f'{s:.6g}') for s in spacing]} mm "
            f"(axis {int(np.flatnonzero(outside)[0])}); {how}"
        )
    # Columns scaled to unit length, so the test is on the angles, not the spacing: a
    # determinant near 0 means two axes (nearly) coincide and voxels would overlap.
    if abs(np.linalg.det(linear / spacing)) < 1e-6:
        raise MedsegIOError(
            f"{where}: singular affine, its axes do not span 3D space:\n{linear}\n"
            "the header's orientation is corrupt"
        )
    return spacing
