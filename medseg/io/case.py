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
    check_finite,
    nifti_suffix,
    read_nifti,
    read_nifti_case,
    validate_label,
)
from medseg.io.record import CaseRecord

__all__ = ["read_case", "read_channel_case"]

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
    image : str or os.PathLike, or a sequence of them
        A DICOM series folder, a ``.nii``/``.nii.gz`` volume or a ``.png``/``.jpg``/
        ``.jpeg``/``.tif``/``.tiff`` image; a list or tuple of NIfTI files is one case's
        channels (nnU-Net's ``case_0000``, ``case_0001``, ...: :func:`read_channel_case`).
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
    if isinstance(image, list | tuple):
        return read_channel_case(case_id, image, label, num_classes=num_classes)
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


def read_channel_case(
    case_id: str,
    images: list | tuple,
    label: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
) -> CaseRecord:
    """Read a case whose channels are separate NIfTI files (nnU-Net's raw layout).

    Every file's shape and affine are compared from the headers before any volume is
    read, so a mismatched channel costs nothing.

    Parameters
    ----------
    case_id : str
    images : list or tuple of path
        One single-volume NIfTI file per channel, in channel order.
    label : path, optional
        A label map on the same grid.
    num_classes : int, optional
        Label values must lie in ``0 .. num_classes - 1``.

    Returns
    -------
    CaseRecord
        The image stacked channels-last, ``(D, H, W, C)`` (``(D, H, W)`` for one file).

    Raises
    ------
    MedsegIOError
        A file is not NIfTI, holds several volumes, or lies on another grid than the first.
    """
    import nibabel as nib

    paths = [Path(p) for p in images]
    if not paths:
        raise MedsegIOError(f"case {case_id!r}: no channel file given")
    for path in paths:
        if nifti_suffix(path) is None:
            raise MedsegIOError(
                f"case {case_id!r}: {path}: channel files must be .nii or .nii.gz"
            )
        if not path.exists():
            raise MedsegIOError(f"case {case_id!r}: {path}: no such file")
    first = nib.load(paths[0])
    for path in paths[1:]:
        other = nib.load(path)
        if other.shape[:3] != first.shape[:3]:
            raise MedsegIOError(
                f"case {case_id!r}: {path} has shape {other.shape[:3]} but {paths[0]} has "
                f"{first.shape[:3]}; every channel must share one grid"
            )
        if not np.allclose(other.affine, first.affine, atol=AFFINE_ATOL_MM):
            diff = float(np.abs(other.affine - first.affine).max())
            raise MedsegIOError(
                f"case {case_id!r}: {path} has another affine than {paths[0]} (max "
                f"difference {diff:.4g} mm); every channel must share one grid"
            )
    del first
    record = read_nifti_case(case_id, paths[0], label, num_classes=num_classes)
    if len(paths) == 1:
        return record
    volumes = [record.image]
    for path in paths[1:]:
        array, _, _ = read_nifti(path)
        check_finite(array, where=f"case {case_id!r}: {path}")
        volumes.append(array)
    for path, volume in zip(paths, volumes, strict=True):
        if volume.ndim == 4 and volume.shape[3] != 1:
            raise MedsegIOError(
                f"case {case_id!r}: {path} holds {volume.shape[3]} volumes; give one channel "
                "per file (<case>_0000, <case>_0001, ...)"
            )
    volumes = [v[..., 0] if v.ndim == 4 else v for v in volumes]
    dtype = np.result_type(*volumes)
    record.image = np.stack([v.astype(dtype, copy=False) for v in volumes], axis=-1)
    record.source = ", ".join(str(p) for p in [*paths, *([label] if label else [])])
    return record
