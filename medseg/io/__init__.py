"""Reading and writing cases (NIfTI, DICOM series, 2D images) and their geometry.

Volumes are kept in array-axis order; an affine maps voxel indices ``(i, j, k, 1)`` to
world millimetres (:mod:`medseg.io.geometry`). Readers refuse, from the headers and before
reading any voxel, images over ``MAX_IMAGE_BYTES`` (env ``MEDSEG_MAX_IMAGE_BYTES``) and
spacings outside ``SPACING_RANGE_MM`` (env ``MEDSEG_SPACING_RANGE_MM``).
"""

from __future__ import annotations

__all__ = [
    "MAX_IMAGE_BYTES",
    "SPACING_RANGE_MM",
    "CaseRecord",
    "MedsegIOError",
    "check_geometry",
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
from medseg.io.geometry import (
    SPACING_RANGE_MM,
    check_geometry,
    kits19_affine,
    spacing_from_affine,
)
from medseg.io.image2d import read_image2d, read_image2d_case
from medseg.io.nifti import (
    MAX_IMAGE_BYTES,
    MedsegIOError,
    read_nifti,
    read_nifti_case,
    write_like,
    write_nifti,
)
from medseg.io.record import CaseRecord
