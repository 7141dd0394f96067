"""Reading and writing cases (NIfTI, DICOM series, 2D images) and their geometry.

Volumes are kept in array-axis order; an affine maps voxel indices ``(i, j, k, 1)`` to
world millimetres (:mod:`medseg.io.geometry`).
"""

from __future__ import annotations

__all__ = [
    "CaseRecord",
    "MedsegIOError",
    "kits19_affine",
    "list_dicom_series",
    "read_case",
    "read_dicom_series",
    "read_image2d",
    "read_image2d_case",
    "read_nifti",
    "read_nifti_case",
    "spacing_from_affine",
    "write_like",
    "write_nifti",
]


from medseg.io.case import read_case
from medseg.io.dicom import list_dicom_series, read_dicom_series
from medseg.io.geometry import kits19_affine, spacing_from_affine
from medseg.io.image2d import read_image2d, read_image2d_case
from medseg.io.nifti import (
    MedsegIOError,
    read_nifti,
    read_nifti_case,
    write_like,
    write_nifti,
)
from medseg.io.record import CaseRecord
