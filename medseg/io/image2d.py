"""Reading 2D images (PNG, JPEG, TIFF) as one-slice volumes.

2D images carry no patient geometry, so the affine is a plain diagonal of the spacing:
array axis 0 (the single slice) -> x, rows -> y, columns -> z.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from medseg.io.nifti import MedsegIOError, check_finite, validate_label
from medseg.io.record import CaseRecord

__all__ = ["IMAGE2D_SUFFIXES", "read_image2d", "read_image2d_case"]

IMAGE2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def read_image2d(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPEG/TIFF image as a one-slice volume.

    Parameters
    ----------
    path : str or os.PathLike
        Image file; for multi-page TIFFs only the first page is read.

    Returns
    -------
    np.ndarray
        ``(1, H, W)`` for grayscale or ``(1, H, W, C)`` for colour, in the file's dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsegIOError(f"{path}: no such file")
    try:
        # index=0: the first page/frame, so multi-page files do not add an axis.
        array = np.asarray(iio.imread(path, index=0))
    except Exception as err:  # imageio's plugins raise many types for unreadable files
        raise MedsegIOError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    if array.ndim not in (2, 3) or array.size == 0:
        raise MedsegIOError(f"{path}: expected a 2D image, got array shape {array.shape}")
    return array[np.newaxis]


def read_image2d_case(
    case_id: str,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    spacing: Sequence[float] = (1.0, 1.0),
) -> CaseRecord:
    """Read a 2D image (and label mask) into a one-slice :class:`CaseRecord`.

    Parameters
    ----------
    case_id : str
        Name of the case, used in error messages.
    image_path : str or os.PathLike
        Image file.
    label_path : str or os.PathLike, optional
        Label mask of class indices, same height and width; a single-channel image (or an
        RGB one whose channels are all equal).
    spacing : sequence of float, optional
        ``(row, col)`` pixel spacing in millimetres; the slice axis gets 1.0.

    Returns
    -------
    CaseRecord
        ``image`` ``(1, H, W)`` or ``(1, H, W, C)``, ``label`` uint8 ``(1, H, W)``.
    """
    image_path = Path(image_path)
    row_mm, col_mm = (float(s) for s in spacing)
    image = read_image2d(image_path)
    check_finite(image, where=f"case {case_id!r}: {image_path}")
    label = None
    sources = [str(image_path)]
    if label_path is not None:
        label_path = Path(label_path)
        where = f"case {case_id!r}: {label_path}"
        if not label_path.exists():
            raise MedsegIOError(f"{where}: label file does not exist")
        raw = read_image2d(label_path)
        if raw.ndim == 4:
            # Masks saved as RGB(A) grey images: accept only if the colour channels agree.
            if not all(
                np.array_equal(raw[..., 0], raw[..., c]) for c in range(min(3, raw.shape[-1]))
            ):
                raise MedsegIOError(f"{where}: label is a colour image; expected class indices")
            raw = raw[..., 0]
        if raw.shape != image.shape[:3]:
            raise MedsegIOError(
                f"{where}: label shape {raw.shape[1:]} does not match image shape "
                f"{image.shape[1:3]} of {image_path}"
            )
        label = validate_label(raw, where=where)
        sources.append(str(label_path))
    return CaseRecord(
        case_id=case_id,
        image=image,
        spacing=(1.0, row_mm, col_mm),
        affine=np.diag([1.0, row_mm, col_mm, 1.0]),
        label=label,
        source=", ".join(sources),
    )
