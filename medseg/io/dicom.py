"""Reading a DICOM series folder into one volume with its patient geometry.

Slices are ordered by where they are (ImagePositionPatient projected on the slice normal),
never by file name or InstanceNumber, which scanners and anonymisers do not keep
consistent. The affine maps (slice, row, col) indices to RAS+ millimetres like NIfTI's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.io.nifti import MedsegIOError
from medseg.io.record import CaseRecord

__all__ = ["list_dicom_series", "read_dicom_series"]

# Media Storage Directory (DICOMDIR) SOP class: an index, not an image.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# A slice step may differ from the median by this fraction before it counts as a gap.
GAP_TOLERANCE = 0.01
# Orientation cosines are decimal strings; allow their rounding.
_ORIENTATION_ATOL = 1e-4
# LPS (DICOM) -> RAS (NIfTI): negate the x and y world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _scan(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """Headers of the image files directly in ``folder``, grouped by SeriesInstanceUID."""
    if not folder.is_dir():
        raise MedsegIOError(f"{folder}: not a directory (expected a DICOM series folder)")
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError):
            continue  # not DICOM (README, thumbnails, ...) or unreadable: not part of a series
        if ds.get("SOPClassUID") == _DICOMDIR_SOP_CLASS or "Rows" not in ds:
            continue  # DICOMDIR, structured reports, presentation states: no image
        uid = str(ds.get("SeriesInstanceUID", "")) or "<no SeriesInstanceUID>"
        series.setdefault(uid, []).append((path, ds))
    return series


def list_dicom_series(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """List the image series in a folder.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder holding DICOM files (not searched recursively). Files that are not DICOM,
        DICOMDIR indexes and files without an image are skipped.

    Returns
    -------
    dict of str to list of pathlib.Path
        SeriesInstanceUID -> the series' files, sorted by file name.
    """
    return {uid: [p for p, _ in items] for uid, items in _scan(Path(folder)).items()}


def _floats(ds: pydicom.Dataset, keyword: str, path: Path, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise MedsegIOError(f"{path}: missing {keyword}; cannot place the slice in space")
    values = np.asarray([float(v) for v in value], dtype=np.float64)
    if values.shape != (n,):
        raise MedsegIOError(f"{path}: {keyword} has {values.size} values, expected {n}")
    return values


def read_dicom_series(folder: str | os.PathLike, *, series_uid: str | None = None) -> CaseRecord:
    """Read one DICOM series into a (slices, rows, cols) volume.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder of DICOM files; its name becomes the case id.
    series_uid : str, optional
        SeriesInstanceUID to read when the folder holds several series.

    Returns
    -------
    CaseRecord
        ``image`` in (slices, rows, cols) order with RescaleSlope/Intercept applied (HU
        for CT): int16 when every value is an integer in int16 range, else float32.
        Slices are sorted along the slice normal (row x column direction cosines) by the
        projection of ImagePositionPatient. ``affine`` maps (slice, row, col) to RAS+ mm;
        ``spacing`` is (slice step from the positions, row spacing, column spacing).

    Raises
    ------
    MedsegIOError
        Naming the folder for: no image series, several series without ``series_uid``,
        differing orientations or pixel grids, duplicate slice positions, non-uniform
        slice spacing (a gap), unreadable pixel data.
    """
    folder = Path(folder)
    series = _scan(folder)
    if not series:
        raise MedsegIOError(f"{folder}: no DICOM image files found")
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{uid} ({len(items)} files)" for uid, items in series.items())
            raise MedsegIOError(
                f"{folder}: mixed series, {len(series)} SeriesInstanceUIDs in one folder; "
                f"pass series_uid= one of: {listing}"
            )
        series_uid = next(iter(series))
    if series_uid not in series:
        raise MedsegIOError(f"{folder}: no series {series_uid!r}; found {sorted(series)}")
    items = series[series_uid]

    first_path, first = items[0]
    orientation = _floats(first, "ImageOrientationPatient", first_path, 6)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise MedsegIOError(
            f"{first_path}: ImageOrientationPatient {orientation.tolist()} "
            "is not two orthogonal unit vectors"
        )
    pixel_spacing = _floats(first, "PixelSpacing", first_path, 2)  # (between rows, cols)
    grid = (int(first.Rows), int(first.Columns))
    positions = []
    for path, ds in items:
        other = _floats(ds, "ImageOrientationPatient", path, 6)
        if not np.allclose(other, orientation, atol=_ORIENTATION_ATOL):
            raise MedsegIOError(
                f"{folder}: slices have different ImageOrientationPatient: "
                f"{first_path.name} {orientation.tolist()} vs {path.name} {other.tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != grid:
            raise MedsegIOError(
                f"{folder}: slices have different sizes: {first_path.name} {grid} vs "
                f"{path.name} {(int(ds.Rows), int(ds.Columns))}"
            )
        if not np.allclose(_floats(ds, "PixelSpacing", path, 2), pixel_spacing, atol=1e-4):
            raise MedsegIOError(
                f"{folder}: slices have different PixelSpacing: {first_path.name} vs {path.name}"
            )
        positions.append(_floats(ds, "ImagePositionPatient", path, 3))

    positions_arr = np.stack(positions)
    along = positions_arr @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    positions_arr = positions_arr[order]
    paths = [items[i][0] for i in order]

    steps = np.diff(along)
    duplicate = np.flatnonzero(steps < 1e-3)
    if duplicate.size:
        i = int(duplicate[0])
        raise MedsegIOError(
            f"{folder}: duplicate slice position {positions_arr[i].tolist()} "
            f"in {paths[i].name} and {paths[i + 1].name}"
        )
    if steps.size:
        median = float(np.median(steps))
        off = np.flatnonzero(np.abs(steps - median) > GAP_TOLERANCE * median)
        if off.size:
            i = int(off[0])
            raise MedsegIOError(
                f"{folder}: non-uniform slice spacing (missing slices?): step of "
                f"{steps[i]:.4g} mm between {paths[i].name} at {positions_arr[i].tolist()} and "
                f"{paths[i + 1].name} at {positions_arr[i + 1].tolist()}, "
                f"median step {median:.4g} mm"
            )
        # The mean step vector, not normal * spacing: keeps a gantry tilt's shear exact.
        slice_step = (positions_arr[-1] - positions_arr[0]) / steps.size
    else:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        slice_step = normal * float(thickness)

    slices = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as err:  # pydicom raises many types for bad or unsupported pixels
            raise MedsegIOError(f"{path}: cannot decode pixel data ({err})") from err
        if pixels.shape[:2] != grid or pixels.ndim not in (2, 3):
            raise MedsegIOError(
                f"{path}: pixel array shape {pixels.shape} is not one {grid} frame "
                "(multi-frame files are not supported)"
            )
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        # Slope and intercept may differ per slice (e.g. PET), so rescale slice by slice.
        slices.append(pixels.astype(np.float64) * slope + intercept)
    volume = np.stack(slices)
    info = np.iinfo(np.int16)
    if np.all(volume == np.round(volume)) and volume.min() >= info.min and volume.max() <= info.max:
        image = volume.astype(np.int16)
    else:
        image = volume.astype(np.float32)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = slice_step
    affine_lps[:3, 1] = col_cos * pixel_spacing[0]  # row index moves down a column
    affine_lps[:3, 2] = row_cos * pixel_spacing[1]  # column index moves along a row
    affine_lps[:3, 3] = positions_arr[0]
    affine = _LPS_TO_RAS @ affine_lps
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return CaseRecord(
        case_id=folder.name,
        image=image,
        spacing=spacing,
        affine=affine,
        label=None,
        source=str(folder),
    )
