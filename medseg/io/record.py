"""The one record type every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CaseRecord:
    """One case as read from disk.

    Attributes
    ----------
    case_id : str
        Name of the case, unique within its dataset.
    image : np.ndarray
        ``(D, H, W)`` or ``(D, H, W, C)`` intensities, array axes as the file stores them.
    spacing : tuple of float
        Voxel spacing in millimetres along array axes 0, 1, 2.
    affine : np.ndarray
        ``(4, 4)`` voxel-index → world-millimetre matrix, RAS+ (NIfTI's convention).
    label : np.ndarray or None
        ``(D, H, W)`` integer label map on the image's grid, None if unlabelled.
    source : str
        The file(s) it was read from, for error messages.
    """

    case_id: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    label: np.ndarray | None = None
    source: str = ""
