"""One entry point that reads a case from whatever its files are."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg.io.dicom import read_dicom_series
from medseg.io.image2d import IMAGE2D_SUFFIXES, read_image2d_case
from medseg.io.nifti import (
    AFFINE_ATOL_MM,
    MedsegIOError,
    nifti_suffix,
    read_nifti,
    read_nifti_case,
    validate_label,
)
from medseg.io.record import CaseRecord

__all__ = ["read_case"]

# DICOM positions are decimal strings and NIfTI affines float32: compare grids loosely.
_DICOM_LABEL_ATOL_MM = 1e-2


def read_case(
    case_id: str,
    image: str | os.PathLike,
    label: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
) -> CaseRecord:
    """Read a case, choosing the reader from the image path.

    Parameters
    ----------
    case_id : str
        Name of the case (also replaces the folder name for DICOM series).
    image : str or os.PathLike
        A DICOM series folder, a ``.nii``/``.nii.gz`` volume or a ``.png``/``.jpg``/
        ``.jpeg``/``.tif``/``.tiff`` image.
    label : str or os.PathLike, optional
        Label map. For a DICOM series it must be a NIfTI volume on the series' grid:
        shape (slices, rows, cols) and the same affine.
    num_classes : int, optional
        Label values must lie in ``0 .. num_classes - 1``.

    Returns
    -------
    CaseRecord
        See :func:`read_nifti_case`, :func:`read_dicom_series`, :func:`read_image2d_case`.

    Raises
    ------
    MedsegIOError
        Unknown extension, or any error of the chosen reader.
    """
    path = Path(image)
    if path.is_dir():
        record = read_dicom_series(path)
        record.case_id = case_id
        if label is not None:
            record.label = _dicom_label(case_id, path, Path(label), record, num_classes)
            record.source = f"{record.source}, {label}"
        return record
    if nifti_suffix(path) is not None:
        return read_nifti_case(case_id, path, label, num_classes=num_classes)
    if path.suffix.lower() in IMAGE2D_SUFFIXES:
        record = read_image2d_case(case_id, path, label)
        if record.label is not None and num_classes is not None:
            validate_label(
                record.label, where=f"case {case_id!r}: {label}", num_classes=num_classes
            )
        return record
    if not path.exists():
        raise MedsegIOError(f"case {case_id!r}: {path}: no such file or directory")
    raise MedsegIOError(
        f"case {case_id!r}: {path}: unknown extension {''.join(path.suffixes) or '(none)'}; "
        f"expected a DICOM folder, .nii, .nii.gz or one of {', '.join(IMAGE2D_SUFFIXES)}"
    )


def _dicom_label(
    case_id: str, folder: Path, label_path: Path, record: CaseRecord, num_classes: int | None
) -> np.ndarray:
    where = f"case {case_id!r}: {label_path}"
    if nifti_suffix(label_path) is None:
        raise MedsegIOError(f"{where}: labels of a DICOM series must be .nii or .nii.gz")
    if not label_path.exists():
        raise MedsegIOError(f"{where}: label file does not exist")
    try:
        raw, affine, _ = read_nifti(label_path)
    except MedsegIOError as err:  # file errors name only the path: add the case
        raise MedsegIOError(f"case {case_id!r}: {err}") from err
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.shape != record.image.shape[:3]:
        raise MedsegIOError(
            f"{where}: label shape {raw.shape} does not match the (slices, rows, cols) shape "
            f"{record.image.shape[:3]} of DICOM series {folder}"
        )
    if not np.allclose(affine, record.affine, atol=max(AFFINE_ATOL_MM, _DICOM_LABEL_ATOL_MM)):
        raise MedsegIOError(
            f"{where}: label affine differs from the geometry of DICOM series {folder} "
            f"(max difference {np.abs(affine - record.affine).max():.4g} mm)"
        )
    return validate_label(raw, where=where, num_classes=num_classes)
