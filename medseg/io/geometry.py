"""Geometry helpers shared by datasets, preprocessing and export.

Volumes are kept in array-axis order; an affine maps voxel indices ``(i, j, k, 1)`` to
world millimetres, so spacing is read from it column by column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["kits19_affine", "spacing_from_affine"]


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
