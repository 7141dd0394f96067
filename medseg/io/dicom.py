"""Reading a DICOM series folder into one volume with its patient geometry.

Slices are ordered by where they are (ImagePositionPatient projected on the slice normal),
never by file name or InstanceNumber, which scanners and anonymisers do not keep
consistent. The affine maps (slice, row, col) indices to RAS+ millimetres like NIfTI's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from medseg.io.geometry import check_geometry
from medseg.io.nifti import MedsegIOError, max_image_bytes
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
# Any of these at top level makes a file an image of the series (which must then carry
# all of _REQUIRED); files with none are reports, presentation states, etc.
_IMAGE_TAGS = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "BitsAllocated",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
# Required per slice, in the order they are checked, with why they are needed.
_REQUIRED = {
    "Rows": "cannot tell the image size",
    "Columns": "cannot tell the image size",
    "ImageOrientationPatient": "cannot place the slice in space",
    "ImagePositionPatient": "cannot place the slice in space",
    "PixelSpacing": "cannot tell the pixel size",
}
# Slices are staged as float32 (4 bytes) while the rescale is applied.
_STAGING_DTYPE = np.dtype(np.float32)


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
        if ds.get("SOPClassUID") == _DICOMDIR_SOP_CLASS or not any(
            keyword in ds for keyword in _IMAGE_TAGS
        ):
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


def _tag_name(keyword: str) -> str:
    """``"Rows (0028,0010)"``: the keyword and the tag users find in DICOM dumps."""
    return f"{keyword} {Tag(tag_for_keyword(keyword))}"


def _present(ds: pydicom.Dataset, keyword: str, path: Path):
    """The value of a required tag, or a MedsegIOError naming the file and the tag."""
    try:
        value = ds.get(keyword)
    except (TypeError, ValueError, OverflowError) as err:  # pydicom converts on access
        raise MedsegIOError(f"{path}: {_tag_name(keyword)} is malformed ({err})") from None
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        raise MedsegIOError(
            f"{path}: missing {_tag_name(keyword)}; {_REQUIRED.get(keyword, 'required')}"
        )
    return value


def _floats(ds: pydicom.Dataset, keyword: str, path: Path, n: int) -> np.ndarray:
    value = _present(ds, keyword, path)
    try:
        values = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise MedsegIOError(
            f"{path}: {_tag_name(keyword)} is {value!r}, expected {n} numbers"
        ) from None
    if values.shape != (n,):
        raise MedsegIOError(f"{path}: {keyword} has {values.size} values, expected {n}")
    if not np.all(np.isfinite(values)):
        raise MedsegIOError(f"{path}: {_tag_name(keyword)} holds NaN or inf: {values.tolist()}")
    return values


def _size(ds: pydicom.Dataset, keyword: str, path: Path) -> int:
    value = _present(ds, keyword, path)
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size <= 0:
        raise MedsegIOError(f"{path}: {_tag_name(keyword)} is {value!r}, expected a positive count")
    return size


def _frame(ds: pydicom.Dataset, path: Path) -> tuple[int, int, int]:
    """``(rows, columns, samples per pixel)`` of a one-frame image; multi-frame refused."""
    rows, cols = _size(ds, "Rows", path), _size(ds, "Columns", path)
    frames = _size(ds, "NumberOfFrames", path) if ds.get("NumberOfFrames") else 1
    if frames > 1:
        raise MedsegIOError(
            f"{path}: {_tag_name('NumberOfFrames')} is {frames}; multi-frame files are "
            "not supported (export the series as one file per slice)"
        )
    samples = _size(ds, "SamplesPerPixel", path) if ds.get("SamplesPerPixel") else 1
    return rows, cols, samples


def _rescale(ds: pydicom.Dataset, path: Path, uid: str) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (1 and 0 when absent), refused if not finite."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(keyword, default)
        try:
            value = float(raw if raw not in (None, "") else default)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise MedsegIOError(
                f"{path}: {_tag_name(keyword)} is {raw!r} in series {uid}; "
                "the rescale must be a finite number"
            )
        values.append(value)
    slope, intercept = values
    return slope or 1.0, intercept  # a slope of 0 is a placeholder, as before


def read_dicom_series(
    folder: str | os.PathLike,
    *,
    series_uid: str | None = None,
    max_voxels: int = 2**31,
    max_bytes: int | None = None,
    spacing_range_mm: tuple[float, float] | None = None,
) -> CaseRecord:
    """Read one DICOM series into a (slices, rows, cols) volume.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder of DICOM files; its name becomes the case id.
    series_uid : str, optional
        SeriesInstanceUID to read when the folder holds several series.
    max_voxels : int, optional
        Refuse series of more voxels (Rows x Columns x slices) than this, before any
        pixel data is read.
    max_bytes : int, optional
        Refuse series whose float32 staging volume would exceed this many bytes; default
        ``MEDSEG_MAX_IMAGE_BYTES`` if set, else :data:`medseg.io.nifti.MAX_IMAGE_BYTES`.
    spacing_range_mm : tuple of float, optional
        Allowed ``(low, high)`` voxel spacing, see :func:`medseg.io.geometry.spacing_range`.

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
        slice spacing (a gap), implausible spacing, too many voxels or bytes; naming the
        file for: a missing or malformed required tag (Rows, Columns,
        ImageOrientationPatient, ImagePositionPatient, PixelSpacing), a multi-frame file,
        a non-finite rescale, unreadable pixel data, NaN or inf values after the rescale.
        All but the last two are found from the headers, before any pixel is decoded.
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
    grid = _frame(first, first_path)
    orientation = _floats(first, "ImageOrientationPatient", first_path, 6)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise MedsegIOError(
            f"{first_path}: ImageOrientationPatient {orientation.tolist()} "
            "is not two orthogonal unit vectors"
        )
    pixel_spacing = _floats(first, "PixelSpacing", first_path, 2)  # (between rows, cols)
    positions = []
    rescales = {}
    for path, ds in items:
        other_grid = _frame(ds, path)
        other = _floats(ds, "ImageOrientationPatient", path, 6)
        if not np.allclose(other, orientation, atol=_ORIENTATION_ATOL):
            raise MedsegIOError(
                f"{folder}: slices have different ImageOrientationPatient: "
                f"{first_path.name} {orientation.tolist()} vs {path.name} {other.tolist()}"
            )
        if other_grid != grid:
            raise MedsegIOError(
                f"{folder}: slices have different sizes: {first_path.name} {grid[:2]} vs "
                f"{path.name} {other_grid[:2]}"
                + (" (SamplesPerPixel differs)" if other_grid[:2] == grid[:2] else "")
            )
        position = _floats(ds, "ImagePositionPatient", path, 3)
        if not np.allclose(_floats(ds, "PixelSpacing", path, 2), pixel_spacing, atol=1e-4):
            raise MedsegIOError(
                f"{folder}: slices have different PixelSpacing: {first_path.name} vs {path.name}"
            )
        positions.append(position)
        rescales[path] = _rescale(ds, path, series_uid)

    # Size limits from the headers alone, before a single pixel is decoded.
    rows, cols, samples = grid
    shape = (len(items), rows, cols) + ((samples,) if samples > 1 else ())
    n_voxels = math.prod(shape)
    n_bytes = n_voxels * _STAGING_DTYPE.itemsize
    limit = max_image_bytes(max_bytes)
    claim = (
        f"{_tag_name('Rows')} {rows} x {_tag_name('Columns')} {cols} x {len(items)} slices"
        + (f" x {samples} samples" if samples > 1 else "")
    )
    if n_voxels > max_voxels:
        raise MedsegIOError(
            f"{folder}: {first_path.name}: {claim} = {n_voxels} voxels, more than "
            f"max_voxels={max_voxels}; refusing to read the pixels"
        )
    if n_bytes > limit:
        raise MedsegIOError(
            f"{folder}: {first_path.name}: {claim} = {n_bytes} bytes as float32 "
            f"({n_bytes / 2**30:.3g} GiB), more than max_bytes={limit}; pass max_bytes= or "
            "set MEDSEG_MAX_IMAGE_BYTES to a larger byte count if the series is really this big"
        )

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
        try:
            slice_step = normal * float(thickness)
        except (TypeError, ValueError):
            raise MedsegIOError(
                f"{first_path}: SliceThickness {thickness!r} is not a number"
            ) from None

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = slice_step
    affine_lps[:3, 1] = col_cos * pixel_spacing[0]  # row index moves down a column
    affine_lps[:3, 2] = row_cos * pixel_spacing[1]  # column index moves along a row
    affine_lps[:3, 3] = positions_arr[0]
    affine = _LPS_TO_RAS @ affine_lps
    spacing = check_geometry(
        affine,
        where=f"{folder}: series {series_uid} ({first_path.name} and {len(items) - 1} more)",
        spacing_range_mm=spacing_range_mm,
    )

    try:
        volume = np.empty(shape, dtype=_STAGING_DTYPE)
    except MemoryError:
        raise MedsegIOError(
            f"{folder}: out of memory staging {claim} ({n_bytes / 2**30:.3g} GiB as float32)"
        ) from None
    info = np.iinfo(np.int16)
    fits_int16 = True
    for k, path in enumerate(paths):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as err:  # pydicom raises many types for bad or unsupported pixels
            raise MedsegIOError(f"{path}: cannot decode pixel data ({err})") from err
        if pixels.shape != shape[1:]:
            raise MedsegIOError(
                f"{path}: pixel array shape {pixels.shape} is not one {shape[1:]} frame "
                "(multi-frame files are not supported)"
            )
        # Slope and intercept may differ per slice (e.g. PET), so rescale slice by slice;
        # float64 for one slice only, so the int16 test below sees exact values.
        slope, intercept = rescales[path]
        rescaled = pixels.astype(np.float64) * slope + intercept
        volume[k] = rescaled
        bad = ~np.isfinite(volume[k])  # after the float32 cast: catches overflow too
        if bad.any():
            raise MedsegIOError(
                f"{path}: {int(bad.sum())} pixels are NaN or inf after RescaleSlope {slope:g} "
                f"and RescaleIntercept {intercept:g} (series {series_uid}); the pixel data or "
                "the rescale tags are corrupt"
            )
        fits_int16 = fits_int16 and bool(
            np.all(rescaled == np.round(rescaled))
            and rescaled.min() >= info.min
            and rescaled.max() <= info.max
        )
    image = volume.astype(np.int16) if fits_int16 else volume

    return CaseRecord(
        case_id=folder.name,
        image=image,
        spacing=tuple(float(s) for s in spacing),
        affine=affine,
        label=None,
        source=str(folder),
    )
