"""Reading and writing NIfTI volumes without losing their geometry.

Arrays stay in the file's voxel order (no reorientation), so KiTS19 volumes stay
(slices, rows, cols); the affine follows nibabel's ``img.affine`` rule (sform if its code
is set, else qform, else the fallback). Every failure is a :class:`MedsegIOError` naming
the file and the problem.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from medseg.io.atomic import write_atomically
from medseg.io.errors import MedsegIOError
from medseg.io.geometry import check_geometry, spacing_from_affine
from medseg.io.record import CaseRecord

__all__ = [
    "MedsegIOError",
    "read_nifti",
    "read_nifti_case",
    "write_like",
    "write_nifti",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Errors nibabel, gzip and numpy raise on truncated or corrupt files.
_CORRUPT_ERRORS = (
    ImageFileError,
    HeaderDataError,
    EOFError,
    OSError,
    zlib.error,
    ValueError,
)

# Image and label grids may disagree by float32 rounding of the stored affines.
AFFINE_ATOL_MM = 1e-3

# Largest array a read may return (after scaling), in bytes. 4 GiB holds the biggest
# clinical volumes (a 1500 x 512 x 512 whole-body CT is 1.5 GiB as float32, 3 GiB as
# float64) while a corrupt header cannot make a read take the machine's memory.
MAX_IMAGE_BYTES = 4 * 2**30
# Overrides MAX_IMAGE_BYTES where no max_bytes= is passed (e.g. inside dataset builders).
MAX_IMAGE_BYTES_ENV = "MEDSEG_MAX_IMAGE_BYTES"
# Deflate cannot compress better than ~1032:1 (one 258-byte match per ~2 bits), so a gzip
# file of n bytes never holds more than this many times n: a bound that holds whatever
# the number of gzip members.
_DEFLATE_MAX_RATIO = 1032


def nifti_suffix(path: str | os.PathLike) -> str | None:
    """Return ``".nii"`` or ``".nii.gz"`` for a NIfTI path, else None."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".nii"):  # longest first: ".nii.gz" also ends in "gz"
        if name.endswith(suffix):
            return suffix
    return None


def _require_file(path: Path, what: str = "file") -> None:
    if not path.exists():
        raise MedsegIOError(f"{path}: no such {what}")
    if not path.is_file():
        raise MedsegIOError(f"{path}: not a regular file")


def max_image_bytes(max_bytes: int | None = None) -> int:
    """The byte limit of one image read.

    Parameters
    ----------
    max_bytes : int, optional
        Explicit limit; else the ``MEDSEG_MAX_IMAGE_BYTES`` environment variable, else
        :data:`MAX_IMAGE_BYTES`.

    Returns
    -------
    int
        A positive number of bytes.
    """
    source = "max_bytes"
    if max_bytes is None:
        text = os.environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
        if not text:
            return MAX_IMAGE_BYTES
        source = f"environment variable {MAX_IMAGE_BYTES_ENV}={text!r}"
        try:
            max_bytes = int(float(text))  # "8e9" as well as "8000000000"
        except (ValueError, OverflowError):
            max_bytes = 0
    if int(max_bytes) <= 0:
        raise ValueError(f"{source}: expected a positive number of bytes, e.g. {MAX_IMAGE_BYTES}")
    return int(max_bytes)


def _limit_hint(limit: int) -> str:
    return (
        f"max_bytes={limit} ({limit / 2**30:.3g} GiB); pass max_bytes= or set "
        f"{MAX_IMAGE_BYTES_ENV} to a larger byte count if the volume is really this big"
    )


def _scaled_dtype(proxy) -> np.dtype:
    """The dtype ``np.asanyarray(proxy)`` will have, found without reading the data.

    Mirrors nibabel's ``ArrayProxy._get_scaled`` on a one-voxel array: the result dtype
    depends on the on-disk dtype and the scale factors' types only, not on the values.
    """
    from nibabel.volumeutils import apply_read_scaling

    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    if np.can_cast(inter, slope.dtype):
        inter = inter.astype(slope.dtype)
    if np.can_cast(slope, slope.dtype):
        slope = slope.astype(slope.dtype)
    return apply_read_scaling(np.zeros(1, dtype=proxy.dtype), slope, inter).dtype


def _gzip_data_bytes(path: Path, need: int) -> tuple[int, str]:
    """Count the decompressed bytes of ``path`` up to ``need``, in bounded memory.

    Returns the count and, if the stream ended badly, the error that ended it.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as stream:  # reads every member, like nibabel does
            while total < need:
                chunk = stream.read(min(2**20, need - total))
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as err:
        return total, f"{type(err).__name__}: {err}"
    return total, ""


def _check_data_size(path: Path, need: int, what: str) -> None:
    """Refuse a file too short for the data its header declares, without reading it.

    ``need`` is the header's data offset plus the on-disk data bytes.
    """
    size = path.stat().st_size
    if nifti_suffix(path) == ".nii":
        if size < need:
            raise MedsegIOError(
                f"{path}: truncated or corrupt (file has {size} bytes, its header needs "
                f"{need}: {what}); copy or export the file again"
            )
        return
    if need > _DEFLATE_MAX_RATIO * size:
        raise MedsegIOError(
            f"{path}: truncated or corrupt ({size} compressed bytes cannot hold the {need} "
            f"bytes its header needs: {what}; gzip compresses at most "
            f"{_DEFLATE_MAX_RATIO}:1); copy or export the file again"
        )
    if need >= 2**32:
        return  # ISIZE is the size mod 2**32: any value is consistent with a long file
    with path.open("rb") as handle:
        handle.seek(-4, os.SEEK_END)
        isize = int.from_bytes(handle.read(4), "little")  # gzip trailer: RFC 1952
    if isize >= need:
        # Enough, or a misleading trailer (corrupt tail, several members): nibabel's own
        # read then fails cleanly, and the allocation is already bounded by max_bytes.
        return
    # ISIZE counts only the last member, so a short one is not proof (multi-member gzip
    # from bgzip or cat): count the stream to be sure. Valid files rarely get here.
    got, error = _gzip_data_bytes(path, need)
    if got < need:
        ended = f"; {error}" if error else ""
        raise MedsegIOError(
            f"{path}: truncated or corrupt (decompresses to {got} bytes, its header needs "
            f"{need}: {what}{ended}); copy or export the file again"
        )


def _load_header_only(path: Path) -> nib.Nifti1Image:
    """``nib.load`` that turns every parsing failure into a MedsegIOError (data not read)."""
    _require_file(path)
    if nifti_suffix(path) is None:
        raise MedsegIOError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        # mmap=False: the file must not stay mapped, or replacing it later fails on some OSes.
        img = nib.load(path, mmap=False)
    except _CORRUPT_ERRORS as err:
        raise MedsegIOError(f"{path}: truncated or corrupt ({type(err).__name__}: {err})") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise MedsegIOError(f"{path}: not a NIfTI-1/2 image (nibabel read {type(img).__name__})")
    return img


def read_nifti(
    path: str | os.PathLike,
    *,
    max_voxels: int = 2**31,
    max_bytes: int | None = None,
    spacing_range_mm: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI volume in the file's voxel order.

    Parameters
    ----------
    path : str or os.PathLike
        ``.nii`` or ``.nii.gz`` file.
    max_voxels : int, optional
        Refuse files whose header claims more voxels than this (checked before any data is
        read, so a corrupt header cannot trigger a huge allocation).
    max_bytes : int, optional
        Refuse files whose data would take more bytes than this once read (voxels times
        the item size of the returned dtype, i.e. after ``scl_slope``/``scl_inter``).
        Default: ``MEDSEG_MAX_IMAGE_BYTES`` if set, else :data:`MAX_IMAGE_BYTES` (4 GiB).
    spacing_range_mm : tuple of float, optional
        Allowed ``(low, high)`` voxel spacing; default ``MEDSEG_SPACING_RANGE_MM`` if
        set, else :data:`medseg.io.geometry.SPACING_RANGE_MM` (0.01 .. 20 mm).

    Returns
    -------
    array : np.ndarray
        ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (a 4th NIfTI axis is returned as channels-last).
        Integer dtype is kept unless the header scales the data (``scl_slope != 1`` or
        ``scl_inter != 0``), in which case the scaled float values are returned.
    affine : np.ndarray
        ``(4, 4)`` float64 voxel-to-world (RAS+ mm): sform if ``sform_code > 0``, else qform
        if ``qform_code > 0``, else nibabel's fallback.
    header : nibabel.Nifti1Header
        The file's header (a ``Nifti2Header``, its subclass, for NIfTI-2 files).

    Raises
    ------
    MedsegIOError
        Missing, truncated or corrupt file, too many voxels or bytes, a file shorter than
        its header declares, implausible spacing or a singular affine, an unsupported
        shape, or too little memory. All but the last are found from the header alone.
    """

    path = Path(path)
    img = _load_header_only(path)
    shape = tuple(int(n) for n in img.header.get_data_shape())
    n_voxels = math.prod(shape)  # Python ints: no overflow on absurd headers
    if n_voxels > max_voxels:
        raise MedsegIOError(
            f"{path}: header claims shape {shape} = {n_voxels} voxels, "
            f"more than max_voxels={max_voxels}; refusing to load"
        )
    if n_voxels == 0:
        raise MedsegIOError(f"{path}: empty image, header shape {shape}")
    if len(shape) > 4 and all(n == 1 for n in shape[3:-1]):
        # NIfTI stores vector data as (X, Y, Z, 1, C): the time axis is a placeholder.
        shape = (*shape[:3], shape[-1])
    if len(shape) > 4:
        raise MedsegIOError(f"{path}: unsupported {len(shape)}D shape {shape}")
    proxy = img.dataobj
    try:
        out_dtype = _scaled_dtype(proxy)
    except (TypeError, ValueError) as err:  # e.g. an on-disk dtype nibabel cannot scale
        raise MedsegIOError(f"{path}: truncated or corrupt ({type(err).__name__}: {err})") from err
    n_bytes = n_voxels * out_dtype.itemsize
    limit = max_image_bytes(max_bytes)
    if n_bytes > limit:
        raise MedsegIOError(
            f"{path}: header claims shape {shape} of {out_dtype} = {n_bytes} bytes "
            f"({n_bytes / 2**30:.3g} GiB), more than {_limit_hint(limit)}; refusing to load"
        )
    raw_dtype = np.dtype(proxy.dtype)
    offset = int(proxy.offset)
    _check_data_size(
        path,
        offset + n_voxels * raw_dtype.itemsize,
        f"offset {offset} + {n_voxels} voxels x {raw_dtype.itemsize} B ({raw_dtype})",
    )
    affine = np.asarray(img.affine, dtype=np.float64)
    check_geometry(affine, where=str(path), spacing_range_mm=spacing_range_mm)
    try:
        array = np.asanyarray(proxy)
        array = np.asarray(array).reshape(shape)
        if not array.dtype.isnative:
            # Big-endian files: TensorFlow and most numeric code expect native byte order.
            array = array.astype(array.dtype.newbyteorder("="))
    except MemoryError:
        # Under the byte limit but more than this process can get: the same clear error.
        raise MedsegIOError(
            f"{path}: out of memory reading shape {shape} of {out_dtype} "
            f"({n_bytes / 2**30:.3g} GiB); free memory, or crop or resample the volume"
        ) from None
    except _CORRUPT_ERRORS as err:
        raise MedsegIOError(f"{path}: truncated or corrupt ({type(err).__name__}: {err})") from err
    if len(shape) < 3:
        # A 2D NIfTI is one slice; give it the third axis its affine already has.
        array = array.reshape(shape + (1,) * (3 - len(shape)))
    return array, affine, img.header


def _header_for(array: np.ndarray, affine: np.ndarray, header) -> nib.Nifti1Header:
    """A header holding ``affine`` with the reference's codes, units and pixdim kept."""
    if header is None:
        hdr = nib.Nifti1Header()
        hdr.set_xyzt_units("mm", "sec")
    else:
        hdr = header.copy()
    hdr.set_data_shape(array.shape)
    hdr.set_data_dtype(array.dtype)
    hdr.set_slope_inter(None, None)  # the array is written unscaled
    sform_code = int(hdr["sform_code"])
    qform_code = int(hdr["qform_code"])
    if sform_code == 0 and qform_code == 0:
        sform_code = qform_code = 2  # "aligned": a fresh file gets both forms set
    # Codes are kept as the reference had them: a qform-only reference (KiTS19's quirky
    # segmentations) stays qform-only, so readers pick the same form for both files.
    hdr.set_sform(affine, code=sform_code)
    if qform_code > 0:
        hdr.set_qform(affine, code=qform_code)
        if not np.allclose(hdr.get_qform(), affine, atol=AFFINE_ATOL_MM):
            # A qform cannot hold shears (e.g. gantry tilt): fall back to the sform.
            hdr.set_qform(affine, code=0)
            hdr.set_sform(affine, code=max(sform_code, 2))
    return hdr


def write_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
) -> Path:
    """Write a NIfTI volume atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.nii`` or ``.nii.gz`` (the suffix decides compression).
    array : np.ndarray
        ``(X, Y, Z)`` or ``(X, Y, Z, C)`` data in voxel order; its dtype is the on-disk
        dtype (bool is stored as uint8).
    affine : np.ndarray
        ``(4, 4)`` voxel-to-world matrix to store.
    header : nibabel.Nifti1Header, optional
        Reference header to copy (orientation codes, pixdim, units, description); its
        data dtype, shape and scaling are replaced by the array's.

    Returns
    -------
    pathlib.Path
        The written path. The file is written to a temporary file in the same directory
        and moved into place, so it is never seen half-written.
    """
    path = Path(path)
    suffix = nifti_suffix(path)
    if suffix is None:
        raise MedsegIOError(f"{path}: cannot write NIfTI, expected a .nii or .nii.gz suffix")
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise MedsegIOError(f"{path}: affine must be (4, 4), got {affine.shape}")
    if array.ndim not in (3, 4):
        raise MedsegIOError(f"{path}: expected a 3D or 4D array, got shape {array.shape}")
    try:
        hdr = _header_for(array, affine, header)
    except HeaderDataError as err:
        raise MedsegIOError(f"{path}: cannot store dtype {array.dtype} ({err})") from err
    image_class = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    # affine=None: nibabel then writes our header's forms untouched instead of resetting
    # the codes to its defaults.
    img = image_class(array, None, header=hdr)
    return write_atomically(path, lambda tmp: nib.save(img, str(tmp)))


def write_like(
    path: str | os.PathLike, array: np.ndarray, reference_path: str | os.PathLike
) -> Path:
    """Write ``array`` with the affine and header of the NIfTI file ``reference_path``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.nii`` or ``.nii.gz``.
    array : np.ndarray
        Data on the reference's voxel grid (same first three axes).
    reference_path : str or os.PathLike
        The source volume (e.g. the image a prediction was made from).

    Returns
    -------
    pathlib.Path
        The written path.
    """
    reference_path = Path(reference_path)
    ref = _load_header_only(reference_path)  # header and affine only, data not read
    array = np.asarray(array)
    ref_shape = tuple(int(n) for n in ref.header.get_data_shape())
    if array.shape[:3] != ref_shape[:3]:
        raise MedsegIOError(
            f"{path}: array shape {array.shape} is not on the grid of "
            f"{reference_path} (shape {ref_shape})"
        )
    return write_nifti(path, array, ref.affine, ref.header)


def validate_label(label: np.ndarray, *, where: str, num_classes: int | None = None) -> np.ndarray:
    """Check a label map holds class indices and return it as uint8.

    Parameters
    ----------
    label : np.ndarray
        Label values of any numeric dtype.
    where : str
        Case and file, prefixed to error messages.
    num_classes : int, optional
        Values must lie in ``0 .. num_classes - 1`` when given (else ``0 .. 255``).

    Returns
    -------
    np.ndarray
        The label as uint8.
    """
    label = np.asarray(label)
    if label.dtype.kind not in "biuf":
        raise MedsegIOError(f"{where}: label has non-numeric dtype {label.dtype}")
    if label.size == 0:
        raise MedsegIOError(f"{where}: label is empty")
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)):
            raise MedsegIOError(f"{where}: label contains NaN or inf")
        fractional = label != np.round(label)
        if np.any(fractional):
            example = float(label[fractional].flat[0])
            raise MedsegIOError(
                f"{where}: label has non-integer values (e.g. {example}); expected class indices"
            )
    low, high = label.min().item(), label.max().item()
    top = 255 if num_classes is None else int(num_classes) - 1
    if low < 0 or high > top:
        bad = np.unique(label[(label < 0) | (label > top)])[:10]
        declared = (
            f"declared classes 0..{top} (num_classes={num_classes})"
            if num_classes is not None
            else "uint8 range 0..255"
        )
        raise MedsegIOError(f"{where}: label values {[v.item() for v in bad]} outside {declared}")
    return label.astype(np.uint8)


def check_finite(image: np.ndarray, *, where: str) -> None:
    """Raise MedsegIOError if a float image holds NaN or inf intensities."""
    if image.dtype.kind in "fc" and not np.all(np.isfinite(image)):
        n_bad = int(np.count_nonzero(~np.isfinite(image)))
        raise MedsegIOError(f"{where}: image has {n_bad} NaN or inf intensities")


def _read_for_case(case_id: str, path: Path, max_voxels: int, **limits):
    """:func:`read_nifti`, with the case named in any error (file errors name only paths)."""
    try:
        return read_nifti(path, max_voxels=max_voxels, **limits)
    except MedsegIOError as err:
        raise MedsegIOError(f"case {case_id!r}: {err}") from err


def read_nifti_case(
    case_id: str,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    max_voxels: int = 2**31,
    max_bytes: int | None = None,
    spacing_range_mm: tuple[float, float] | None = None,
) -> CaseRecord:
    """Read a NIfTI image (and label) into a validated :class:`CaseRecord`.

    Parameters
    ----------
    case_id : str
        Name of the case, used in error messages.
    image_path : str or os.PathLike
        Image volume.
    label_path : str or os.PathLike, optional
        Label volume on the same grid (a missing file is an error, not "unlabelled").
    num_classes : int, optional
        Label values must lie in ``0 .. num_classes - 1``.
    max_voxels, max_bytes, spacing_range_mm : optional
        Passed to :func:`read_nifti` for each file.

    Returns
    -------
    CaseRecord
        Image in voxel order, label as uint8, spacing from the image affine.

    Raises
    ------
    MedsegIOError
        Naming the case and file for: unreadable files, image/label shape or affine
        mismatch, NaN/inf intensities, non-integer or out-of-range labels.
    """

    limits = {"max_bytes": max_bytes, "spacing_range_mm": spacing_range_mm}
    image_path = Path(image_path)
    image, affine, _ = _read_for_case(case_id, image_path, max_voxels, **limits)
    check_finite(image, where=f"case {case_id!r}: {image_path}")
    label = None
    sources = [str(image_path)]
    if label_path is not None:
        label_path = Path(label_path)
        where = f"case {case_id!r}: {label_path}"
        if not label_path.exists():
            raise MedsegIOError(f"{where}: label file does not exist")
        raw_label, label_affine, _ = _read_for_case(case_id, label_path, max_voxels, **limits)
        if raw_label.ndim == 4 and raw_label.shape[3] == 1:
            raw_label = raw_label[..., 0]
        if raw_label.shape != image.shape[:3]:
            raise MedsegIOError(
                f"{where}: label shape {raw_label.shape} does not match image shape "
                f"{image.shape} of {image_path}"
            )
        if not np.allclose(label_affine, affine, atol=AFFINE_ATOL_MM):
            raise MedsegIOError(
                f"{where}: label affine differs from the affine of {image_path} "
                f"(max difference {np.abs(label_affine - affine).max():.4g} mm);\n"
                f"label:\n{label_affine}\nimage:\n{affine}"
            )
        label = validate_label(raw_label, where=where, num_classes=num_classes)
        sources.append(str(label_path))
    spacing = tuple(float(s) for s in spacing_from_affine(affine))
    return CaseRecord(
        case_id=case_id,
        image=image,
        spacing=spacing,
        affine=affine,
        label=label,
        source=", ".join(sources),
    )
