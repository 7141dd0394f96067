"""Bad inputs, one table: each must end in a clear error naming the file, under 4 GiB.

Every row writes one bad input under its own folder, then a child process with a 4 GiB
address-space limit calls the public entry point a user would hit. A row passes only if
the call raises the expected class with the expected message (which names the file), and
leaves the folder as it was. A hidden allocation of the data a corrupt header claims
fails under the limit (as MemoryError, or the child dies), so the row fails: see
``test_the_table_fails_rows_whose_fault_is_not_handled``.

To add a row, append a :class:`BadInput` to ``ROWS``: a writer ``write(folder) -> path``
(``path`` is the file or folder the message must name), the consumer as
``"module:function"`` with JSON-able ``args``/``kwargs`` in which ``"{path}"`` and
``"{dir}"`` stand for the written path and the row's folder.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.config import ConfigError
from medseg.io import MedsegIOError, kits19_affine, write_nifti

ADDRESS_SPACE_BYTES = 4 << 30
CHILD_TIMEOUT_S = 300
CT5N = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892001/CT5N"
KITS = kits19_affine((3.0, 0.78, 0.78))


def _same_files(folder: Path, before: dict) -> str | None:
    """Default leftover check: the consumer created, changed and removed nothing."""
    after = _snapshot(folder)
    if after != before:
        added = sorted(set(after) - set(before))
        changed = sorted(k for k in before if after.get(k) != before[k])
        return f"folder changed: added {added}, changed or removed {changed}"
    return None


@dataclass(frozen=True)
class BadInput:
    """One row of the table.

    Attributes
    ----------
    id : str
        Test id.
    write : callable
        ``write(folder) -> path`` writes the bad input under ``folder`` (runs in pytest).
    consumer : str
        ``"module:function"`` the user would call, run in the limited child.
    message : str
        Regular expression the message must contain; the name of ``path`` must appear too.
    error : type
        Expected exception class (a subclass also passes).
    args, kwargs : tuple, dict
        JSON-able arguments; the strings ``"{path}"`` and ``"{dir}"`` inside are replaced.
    env : dict
        Environment variables set in the child for this call only.
    leaves_nothing : callable
        ``check(folder, snapshot) -> problem or None``, run after the call.
    tensorflow : bool
        The consumer is allowed to import TensorFlow (prediction, training, builders):
        such rows run in a second child under the same limit; the others must not.
    """

    id: str
    write: Callable[[Path], Path]
    consumer: str
    message: str
    error: type[BaseException] = MedsegIOError
    args: tuple = ("{path}",)
    kwargs: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    leaves_nothing: Callable[[Path, dict], str | None] = _same_files
    tensorflow: bool = False


# --- writers ---------------------------------------------------------------------------


def _volume(shape=(4, 5, 6), dtype=np.int16):
    return np.random.default_rng(0).integers(-1000, 1000, size=shape).astype(dtype)


def _raw_nifti(path, shape, dtype, *, data=b"", srow=None, slope=None):
    """A NIfTI-1 header written byte by byte (nibabel refuses to save some bad ones)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_data_offset(352)
    if srow is None:
        header.set_qform(np.eye(4), code=1)
    else:  # sform only: a qform cannot hold a singular or non-finite matrix
        header["qform_code"] = 0
        header["sform_code"] = 1
        header["srow_x"], header["srow_y"], header["srow_z"] = np.asarray(srow)[:3]
    if slope is not None:
        header["scl_slope"], header["scl_inter"] = slope, 0.0
    buffer = io.BytesIO()
    header.write_to(buffer)
    buffer.write(b"\x00" * (352 - buffer.tell()) + data)
    content = buffer.getvalue()
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def truncated_gz(folder):
    path = write_nifti(folder / "imaging.nii.gz", _volume((20, 20, 20)), KITS)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def truncated_header(folder):
    path = write_nifti(folder / "imaging.nii.gz", _volume(), KITS)
    path.write_bytes(path.read_bytes()[:40])
    return path


def garbage_gz(folder):
    path = folder / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 3))
    return path


def missing_nifti(folder):
    return folder / "nope.nii.gz"


def header_30000_cubed(folder):
    return _raw_nifti(folder / "huge.nii", (30000,) * 3, np.float32, data=b"garbage" * 10)


def header_8gib_gz(folder):
    """1024^3 float64 = 8 GiB claimed (under the 2^31-voxel cap), no data behind it."""
    return _raw_nifti(folder / "big.nii.gz", (1024,) * 3, np.float64)


def header_8gib_nii(folder):
    return _raw_nifti(folder / "big.nii", (1024,) * 3, np.float64)


def header_scaled_int16(folder):
    """1 GiB of int16 on disk claimed, 4 GiB once scl_slope makes it float64."""
    return _raw_nifti(folder / "scaled.nii.gz", (512, 1024, 1024), np.int16, slope=2.0)


def small_nifti(folder):
    return write_nifti(folder / "small.nii.gz", _volume((10, 10, 10)), KITS)


def short_gz(folder):
    """64^3 int16 claimed, 1000 random bytes given: the compression ratio is plausible,
    only the gzip trailer (ISIZE) and counting tell the data is short."""
    data = np.random.default_rng(1).bytes(1000)
    return _raw_nifti(folder / "short.nii.gz", (64,) * 3, np.int16, data=data)


def short_nii(folder):
    data = np.random.default_rng(1).bytes(1000)
    return _raw_nifti(folder / "short.nii", (64,) * 3, np.int16, data=data)


def _nifti_with_linear(name, linear):
    def write(folder):
        srow = np.eye(4)
        srow[:3, :3] = linear
        data = np.zeros(4 * 5 * 6, np.int16).tobytes()
        return _raw_nifti(folder / name, (4, 5, 6), np.int16, data=data, srow=srow)

    return write


def _case(folder, *, image=None, label=None, label_affine=KITS):
    image = _volume() if image is None else image
    label = np.zeros(image.shape[:3], np.uint16) if label is None else label
    write_nifti(folder / "imaging.nii.gz", image, KITS)
    return write_nifti(folder / "segmentation.nii.gz", label, label_affine)


def case_shape_mismatch(folder):
    return _case(folder, label=np.zeros((4, 5, 7), np.uint8))


def case_affine_mismatch(folder):
    shifted = KITS.copy()
    shifted[0, 3] += 1.0
    return _case(folder, label_affine=shifted)


def case_label_out_of_range(folder):
    label = np.zeros((4, 5, 6), np.uint8)
    label[0, 0, 0] = 3
    return _case(folder, label=label)


def case_float_label(folder):
    label = np.zeros((4, 5, 6), np.float32)
    label[0, 0, 0] = 0.5
    return _case(folder, label=label)


def case_nan_image(folder):
    image = _volume().astype(np.float32)
    image[1, 1, 1] = np.nan
    _case(folder, image=image)
    return folder / "imaging.nii.gz"


def case_missing_label(folder):
    write_nifti(folder / "imaging.nii.gz", _volume(), KITS)
    return folder / "segmentation.nii.gz"


def case_label_bad_spacing(folder):
    return _case(folder, label_affine=np.diag([3.0, 0.78, 1e-6, 1.0]))


def _series(folder, edit=None, file="2392"):
    """A copy of pydicom's CT5N series (5 slices of 16 x 16) with ``edit(ds)`` applied to
    one file (or to every file when ``file`` is None); returns the edited path."""
    series = folder / "ct5n"
    shutil.copytree(CT5N, series)
    for path in sorted(series.iterdir()):
        if edit is not None and file in (None, path.name):
            ds = pydicom.dcmread(path)
            with warnings.catch_warnings():  # pydicom warns when writing invalid values
                warnings.simplefilter("ignore")
                edit(ds)
                ds.save_as(path)
    return series if file is None else series / file


def _setting(keyword, value, file="2392"):
    return lambda folder: _series(folder, lambda ds: setattr(ds, keyword, value), file)


def _without(keyword):
    return lambda folder: _series(folder, lambda ds: delattr(ds, keyword))


def dicom_malformed_spacing(folder):
    path = _series(folder)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"0.488281\\0.488281", b"abcdefgh\\0.488281"))
    return path


def dicom_thick_slices(folder):
    """Slice positions 20x further apart: 50 mm slices."""

    def stretch(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z * 20]

    return _series(folder, stretch, file=None)


def dicom_label_other_affine(folder):
    """A label on the series' (slices, rows, cols) shape but with an identity affine."""
    _series(folder)
    return write_nifti(folder / "seg.nii.gz", np.zeros((5, 16, 16), np.uint8), np.eye(4))


def dicom_label_other_shape(folder):
    _series(folder)
    return write_nifti(folder / "seg.nii.gz", np.zeros((16, 16, 5), np.uint8), np.eye(4))


# --- the table -------------------------------------------------------------------------

READ_NIFTI = "medseg.io:read_nifti"
READ_CASE = "medseg.io:read_nifti_case"
READ_ANY = "medseg.io:read_case"
READ_DICOM = "medseg.io:read_dicom_series"
CASE_ARGS = ("c1", "{dir}/imaging.nii.gz", "{dir}/segmentation.nii.gz")
SERIES = "{dir}/ct5n"
SPACING_HINT = r"allowed 0\.01\.\.20 mm \(pass spacing_range_mm= or set MEDSEG_SPACING_RANGE_MM"

# --- faults above the readers: prediction, builds, configs, models (TensorFlow rows) ------

CLI = "medseg.cli:main"
DEBUG = {"MEDSEG_DEBUG": "1"}  # main() re-raises instead of printing: the table sees it


def _prediction_inputs(folder, target_spacing=(3.0, 1.5, 1.5)):
    """A tiny untrained model, its plan and one CT-like case, as ``medseg predict`` takes."""
    import keras

    from medseg.inference import PredictionPlan
    from medseg.models import build_unet
    from medseg.pipeline.preprocess import PreprocessPlan

    keras.utils.set_random_seed(0)
    build_unet(2, 1, depth=2, filters=4).save(folder / "model.keras")
    preprocess = PreprocessPlan(target_spacing=target_spacing, clip=None, mean=0.0, std=500.0)
    PredictionPlan(preprocess, ("background", "kidney"), patch_size=(8, 16, 16), stride=2).save(
        folder / "plan.json"
    )
    (folder / "cases").mkdir()
    return write_nifti(
        folder / "cases" / "case_a.nii.gz", _volume((10, 30, 28)), kits19_affine((2.5, 0.8, 0.8))
    )


def predict_fine_plan(folder):
    # 10 x 2.5 mm resampled to 0.1 mm: 250 x 16 x 15 voxels, above a bound of 10,000
    return _prediction_inputs(folder, target_spacing=(0.1, 1.5, 1.5))


def predict_into_its_input(folder):
    _prediction_inputs(folder)
    return folder / "cases"


def kits19_only_test_cases(folder):
    root = folder / "kits19"
    (root / "case_00210").mkdir(parents=True)
    write_nifti(root / "case_00210" / "imaging.nii.gz", _volume(), KITS)
    return root


def msd_without_training_cases(folder):
    root = folder / "Task04_Hippocampus"
    root.mkdir()
    meta = {"labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "modality": {"0": "MRI"}, "training": [], "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def no_dataset_built(folder, before):
    """A refused build may leave its lock and empty folders, never a dataset that reads
    as built (TFDS's dataset_info.json) or records."""
    built = [str(p.relative_to(folder)) for p in folder.rglob("*")
             if p.name == "dataset_info.json" or ".tfrecord" in p.name]
    return f"a build left {built}" if built else None


def config_nan_learning_rate(folder):
    path = folder / "config.json"
    path.write_text('{"train": {"learning_rate": NaN}}')  # Python's json reads NaN
    return path


def mlmodel_exported(folder):
    """An MLflow keras model whose MLmodel asks for tf.saved_model.load (no safe mode)."""
    import keras
    import mlflow
    import yaml

    path = folder / "tampered_model"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    mlflow.keras.save_model(model, str(path), pip_requirements=["keras"])
    spec = yaml.safe_load((path / "MLmodel").read_text())
    spec["flavors"]["keras"]["save_exported_model"] = True
    (path / "MLmodel").write_text(yaml.safe_dump(spec))
    return path


ROWS = [
    # The first set: faults that already gave clear errors.
    BadInput(
        "nifti-truncated-gz",
        truncated_gz,
        READ_NIFTI,
        r"imaging\.nii\.gz: truncated or corrupt \(",
    ),
    BadInput(
        "nifti-truncated-header",
        truncated_header,
        READ_NIFTI,
        r"imaging\.nii\.gz: truncated or corrupt",
    ),
    BadInput("nifti-garbage", garbage_gz, READ_NIFTI, r"garbage\.nii\.gz: truncated or corrupt"),
    BadInput("nifti-missing-file", missing_nifti, READ_NIFTI, r"nope\.nii\.gz: no such file"),
    BadInput(
        "nifti-30000-cubed-header",
        header_30000_cubed,
        READ_NIFTI,
        r"huge\.nii: header claims shape \(30000, 30000, 30000\) = 27000000000000 voxels, "
        r"more than max_voxels",
    ),
    BadInput(
        "case-shape-mismatch",
        case_shape_mismatch,
        READ_CASE,
        r"case 'c1': .*segmentation\.nii\.gz: label shape \(4, 5, 7\) does not match",
        args=CASE_ARGS,
    ),
    BadInput(
        "case-affine-mismatch",
        case_affine_mismatch,
        READ_CASE,
        r"case 'c1': .*segmentation\.nii\.gz: label affine differs .*max difference 1 mm",
        args=CASE_ARGS,
    ),
    BadInput(
        "case-label-out-of-range",
        case_label_out_of_range,
        READ_CASE,
        r"segmentation\.nii\.gz: label values \[3\] outside declared classes 0\.\.2",
        args=CASE_ARGS,
        kwargs={"num_classes": 3},
    ),
    BadInput(
        "case-float-label",
        case_float_label,
        READ_CASE,
        r"segmentation\.nii\.gz: label has non-integer values \(e\.g\. 0\.5\)",
        args=CASE_ARGS,
    ),
    BadInput(
        "case-nan-image",
        case_nan_image,
        READ_CASE,
        r"case 'c1': .*imaging\.nii\.gz: image has 1 NaN or inf",
        args=CASE_ARGS,
    ),
    BadInput(
        "case-missing-label",
        case_missing_label,
        READ_CASE,
        r"case 'c1': .*segmentation\.nii\.gz: label file does not exist",
        args=CASE_ARGS,
    ),
    # NIfTI bytes, not voxels: refused from the header, before any allocation.
    BadInput(
        "nifti-8gib-header-over-byte-cap",
        header_8gib_gz,
        READ_NIFTI,
        r"big\.nii\.gz: header claims shape \(1024, 1024, 1024\) of float64 = 8589934592 "
        r"bytes \(8 GiB\), more than max_bytes=4294967296 .*MEDSEG_MAX_IMAGE_BYTES",
    ),
    BadInput(
        "nifti-8gib-gz-header-cap-raised",
        header_8gib_gz,
        READ_NIFTI,
        r"big\.nii\.gz: truncated or corrupt \(\d+ compressed bytes cannot hold the "
        r"8589934944 bytes its header needs",
        kwargs={"max_bytes": 2**40},
    ),
    BadInput(
        "nifti-8gib-nii-header-cap-raised",
        header_8gib_nii,
        READ_NIFTI,
        r"big\.nii: truncated or corrupt \(file has 352 bytes, its header needs 8589934944",
        kwargs={"max_bytes": 2**40},
    ),
    BadInput(
        "nifti-cap-on-scaled-dtype",
        header_scaled_int16,
        READ_NIFTI,
        r"scaled\.nii\.gz: header claims shape \(512, 1024, 1024\) of float64 = 4294967296 "
        r"bytes",
        kwargs={"max_bytes": 2 * 2**30},  # the 1 GiB on disk would fit, the result does not
    ),
    BadInput(
        "nifti-cap-from-environment",
        small_nifti,
        READ_NIFTI,
        r"small\.nii\.gz: header claims shape \(10, 10, 10\) of int16 = 2000 bytes .*"
        r"more than max_bytes=1000 ",
        env={"MEDSEG_MAX_IMAGE_BYTES": "1000"},
    ),
    BadInput(
        "nifti-gz-shorter-than-header",
        short_gz,
        READ_NIFTI,
        r"short\.nii\.gz: truncated or corrupt \(decompresses to 1352 bytes, its header "
        r"needs 524640",
    ),
    BadInput(
        "nifti-nii-shorter-than-header",
        short_nii,
        READ_NIFTI,
        r"short\.nii: truncated or corrupt \(file has 1352 bytes, its header needs 524640",
    ),
    # Geometry at read time.
    BadInput(
        "nifti-spacing-1e-6-mm",
        _nifti_with_linear("tiny.nii", np.diag([1e-6, 1.0, 1.0])),
        READ_NIFTI,
        rf"tiny\.nii: implausible voxel spacing \[1e-06, 1\.0, 1\.0\] mm \(axis 0\); {SPACING_HINT}",
    ),
    BadInput(
        "nifti-spacing-40-mm",
        _nifti_with_linear("thick.nii", np.diag([0.8, 0.8, 40.0])),
        READ_NIFTI,
        rf"thick\.nii: implausible voxel spacing \[0\.8, 0\.8, 40\.0\] mm \(axis 2\); {SPACING_HINT}",
    ),
    BadInput(
        "nifti-spacing-outside-range-from-environment",
        _nifti_with_linear("ct.nii", np.diag([0.8, 0.8, 5.0])),
        READ_NIFTI,
        r"ct\.nii: implausible voxel spacing \[0\.8, 0\.8, 5\.0\] mm \(axis 2\); allowed 0\.5\.\.2 mm",
        env={"MEDSEG_SPACING_RANGE_MM": "0.5,2"},
    ),
    BadInput(
        "nifti-affine-nan",
        _nifti_with_linear("nan.nii", np.diag([np.nan, 1.0, 1.0])),
        READ_NIFTI,
        r"nan\.nii: affine holds NaN or inf",
    ),
    BadInput(
        "nifti-affine-singular",
        _nifti_with_linear("flat.nii", [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
        READ_NIFTI,
        r"flat\.nii: singular affine, its axes do not span 3D space",
    ),
    BadInput(
        "case-label-spacing",
        case_label_bad_spacing,
        READ_CASE,
        r"case 'c1': .*segmentation\.nii\.gz: implausible voxel spacing \[3\.0, 0\.78, 1e-06\]",
        args=CASE_ARGS,
    ),
    # DICOM: required tags, rescale, size limits, geometry; all from the headers.
    *(
        BadInput(
            f"dicom-missing-{keyword}",
            _without(keyword),
            READ_DICOM,
            rf"ct5n/2392: missing {keyword} \({tag}\); ",
            args=(SERIES,),
        )
        for keyword, tag in (
            ("Rows", "0028,0010"),
            ("Columns", "0028,0011"),
            ("PixelSpacing", "0028,0030"),
            ("ImagePositionPatient", "0020,0032"),
            ("ImageOrientationPatient", "0020,0037"),
        )
    ),
    BadInput(
        "dicom-malformed-PixelSpacing",
        dicom_malformed_spacing,
        READ_DICOM,
        r"ct5n/2392: PixelSpacing \(0028,0030\) is \['abcdefgh', '0\.488281'\], "
        r"expected 2 numbers",
        args=(SERIES,),
    ),
    BadInput(
        "dicom-nan-rescale-slope",
        _setting("RescaleSlope", "NaN"),
        READ_DICOM,
        r"ct5n/2392: RescaleSlope \(0028,1053\) is 'NaN' in series 1\.3\.6\.1\.4\.1\.5962\.\S+; "
        r"the rescale must be a finite number",
        args=(SERIES,),
    ),
    BadInput(
        "dicom-rescale-overflows-float32",
        _setting("RescaleIntercept", "1e39"),
        READ_DICOM,
        r"ct5n/2392: 256 pixels are NaN or inf after RescaleSlope 1 and RescaleIntercept "
        r"1e\+39 \(series ",
        args=(SERIES,),
    ),
    BadInput(
        "dicom-rows-columns-over-byte-cap",
        lambda folder: _series(
            folder, lambda ds: (setattr(ds, "Rows", 16384), setattr(ds, "Columns", 16384)), None
        ),
        READ_DICOM,  # 1.3e9 voxels: under max_voxels, 5 GiB as float32 over max_bytes
        r"ct5n: 2062: Rows \(0028,0010\) 16384 x Columns \(0028,0011\) 16384 x 5 slices = "
        r"5368709120 bytes as float32 .*more than max_bytes=4294967296",
        args=(SERIES,),
    ),
    BadInput(
        "dicom-over-max-voxels",
        lambda folder: _series(folder, file=None),
        READ_DICOM,
        r"ct5n: 2062: Rows \(0028,0010\) 16 x Columns \(0028,0011\) 16 x 5 slices = 1280 "
        r"voxels, more than max_voxels=1000",
        args=(SERIES,),
        kwargs={"max_voxels": 1000},
    ),
    BadInput(
        "dicom-multi-frame",
        _setting("NumberOfFrames", 4),
        READ_DICOM,
        r"ct5n/2392: NumberOfFrames \(0028,0008\) is 4; multi-frame files are not supported",
        args=(SERIES,),
    ),
    BadInput(
        "dicom-spacing-1e-6-mm",
        lambda folder: _series(folder, lambda ds: setattr(ds, "PixelSpacing", [1e-6, 1e-6]), None),
        READ_DICOM,
        rf"ct5n: series \S+ \(2062 and 4 more\): implausible voxel spacing \[2\.5, 1e-06, "
        rf"1e-06\] mm \(axis 1\); {SPACING_HINT}",
        args=(SERIES,),
    ),
    BadInput(
        "dicom-50-mm-slices",
        dicom_thick_slices,
        READ_DICOM,
        rf"ct5n: series \S+ \(2062 and 4 more\): implausible voxel spacing \[50\.0, 0\.488281, "
        rf"0\.488281\] mm \(axis 0\); {SPACING_HINT}",
        args=(SERIES,),
    ),
    BadInput(
        "dicom-label-other-affine",
        dicom_label_other_affine,
        READ_ANY,
        r"case 'ct': .*seg\.nii\.gz: label affine differs from the geometry of DICOM series "
        r".*ct5n \(max difference",
        args=("ct", SERIES, "{path}"),
    ),
    BadInput(
        "dicom-label-other-shape",
        dicom_label_other_shape,
        READ_ANY,
        r"case 'ct': .*seg\.nii\.gz: label shape \(16, 16, 5\) does not match the "
        r"\(slices, rows, cols\) shape \(5, 16, 16\)",
        args=("ct", SERIES, "{path}"),
    ),
    # Above the readers: each consumer is what the user calls (the CLI with MEDSEG_DEBUG
    # re-raises), under the same limit, TensorFlow allowed.
    BadInput(
        "predict-resampling-over-the-bound",
        predict_fine_plan,
        CLI,
        r"case_a\.nii\.gz: resampling from shape \(10, 30, 28\) at spacing \(2\.5, 0\.8, 0\.8\) "
        r"mm to the target spacing \(0\.1, 1\.5, 1\.5\) mm gives shape \(250, 16, 15\) = 60,000 "
        r"voxels, above the bound of 10,000",
        error=ValueError,
        args=(["predict", "--model", "{dir}/model.keras", "--plan", "{dir}/plan.json", "{path}",
               "--output", "{dir}/out", "--max-voxels", "10000"],),
        env=DEBUG,
        tensorflow=True,
    ),
    BadInput(
        "predict-output-is-the-input-folder",
        predict_into_its_input,
        CLI,
        r"output folder .*cases \(--output\) is the input folder .*cases: its predictions "
        r"would be read back as cases",
        error=ValueError,
        args=(["predict", "--model", "{dir}/model.keras", "--plan", "{dir}/plan.json", "{path}",
               "--output", "{path}"],),
        env=DEBUG,
        tensorflow=True,
    ),
    BadInput(
        "kits19-only-test-cases",
        kits19_only_test_cases,
        CLI,
        r"no labelled KiTS19 case .* to build the train split from; found 1 test case",
        args=(["build", "kits19", "--manual-dir", "{path}", "--data-dir", "{dir}/tfds"],),
        env=DEBUG,
        leaves_nothing=no_dataset_built,
        tensorflow=True,
    ),
    BadInput(
        "msd-no-training-cases",
        msd_without_training_cases,
        CLI,
        r"dataset\.json: 'training' lists no case",
        args=(["build", "msd", "--config", "Task04_Hippocampus", "--manual-dir", "{path}",
               "--data-dir", "{dir}/tfds"],),
        env=DEBUG,
        leaves_nothing=no_dataset_built,
        tensorflow=True,
    ),
    BadInput(
        "config-nan-learning-rate",
        config_nan_learning_rate,
        "medseg.config:Config.from_file",
        r"config\.json: config key 'train\.learning_rate': nan is not a finite number",
        error=ConfigError,
    ),
    BadInput(
        "mlmodel-save-exported-model",
        mlmodel_exported,
        "medseg.tracking.model:load_model",
        r"save_exported_model: true",
        error=ValueError,
        tensorflow=True,
    ),
]


# --- the runner ------------------------------------------------------------------------

# Runs in the child. The limit is set first thing, before any import: a preexec_fn would
# do the same, but is unsafe in a parent running TensorFlow's threads (pytest here).
_CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
import importlib, json, os, time, traceback

results = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # anything the consumers print goes to stderr, not into the results


def resolve(name):
    module, _, attribute = name.partition(":")
    value = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


for job in json.load(sys.stdin):
    saved = {key: os.environ.get(key) for key in job["env"]}
    os.environ.update(job["env"])
    start = time.perf_counter()
    try:
        value = resolve(job["consumer"])(*job["args"], **job["kwargs"])
        outcome = {"raised": None, "returned": type(value).__name__}
    except BaseException as err:  # MemoryError, SystemExit, ...: every ending is an outcome
        outcome = {
            "raised": f"{type(err).__module__}.{type(err).__qualname__}",
            "expected_class": isinstance(err, resolve(job["error"])),
            "memory_error": isinstance(err, MemoryError),
            "message": str(err),
            "traceback": traceback.format_exc(limit=-4),
        }
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
    outcome["seconds"] = time.perf_counter() - start
    outcome["id"] = job["id"]
    outcome["tensorflow_loaded"] = "tensorflow" in sys.modules
    results.write(json.dumps(outcome) + "\n")
    results.flush()
"""


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _substitute(value, path: Path, folder: Path):
    if isinstance(value, str):
        return value.replace("{path}", str(path)).replace("{dir}", str(folder))
    if isinstance(value, list | tuple):
        return [_substitute(v, path, folder) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, path, folder) for k, v in value.items()}
    return value


@dataclass
class Outcome:
    """What happened to one row: its files, and what the child reported."""

    folder: Path
    path: Path | None = None
    snapshot: dict = field(default_factory=dict)
    write_error: str = ""
    child: dict | None = None
    child_stderr: str = ""


def run_rows(rows: list[BadInput], base: Path) -> dict[str, Outcome]:
    """Write every row's input under ``base/<id>``, then run the consumers in one child
    process limited to :data:`ADDRESS_SPACE_BYTES` of address space."""
    outcomes, jobs = {}, []
    for row in rows:
        folder = base / row.id
        folder.mkdir(parents=True)
        outcome = outcomes[row.id] = Outcome(folder)
        try:
            outcome.path = Path(row.write(folder))
        except Exception as err:  # a broken writer fails its row, not the table
            outcome.write_error = f"{type(err).__name__}: {err}"
            continue
        outcome.snapshot = _snapshot(folder)
        jobs.append(
            {
                "id": row.id,
                "consumer": row.consumer,
                "args": _substitute(list(row.args), outcome.path, folder),
                "kwargs": _substitute(dict(row.kwargs), outcome.path, folder),
                "env": dict(row.env),
                "error": f"{row.error.__module__}:{row.error.__qualname__}",
            }
        )
    # One BLAS thread: thread pools reserve address space that is not the code under test.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    uses_tf = {row.id for row in rows if row.tensorflow}
    for group in ([j for j in jobs if j["id"] not in uses_tf], [j for j in jobs if j["id"] in uses_tf]):
        if not group:
            continue
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(ADDRESS_SPACE_BYTES)],
            input=json.dumps(group),
            capture_output=True,
            text=True,
            env=env,
            cwd=base,  # not the checkout: "python -c" would import medseg from the cwd
            timeout=CHILD_TIMEOUT_S,
        )
        for line in proc.stdout.splitlines():
            result = json.loads(line)
            outcomes[result["id"]].child = result
        for job in group:
            outcomes[job["id"]].child_stderr = (
                f"child exit code {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
            )
    return outcomes


def check_row(row: BadInput, outcome: Outcome) -> None:
    """Raise AssertionError unless the row's fault ended in its clear error."""
    assert not outcome.write_error, f"{row.id}: writer failed: {outcome.write_error}"
    result = outcome.child
    assert result is not None, f"{row.id}: no result, the child died\n{outcome.child_stderr}"
    assert row.tensorflow or not result["tensorflow_loaded"], (
        f"{row.id}: {row.consumer} imported TensorFlow"
    )
    assert result["raised"] is not None, (
        f"{row.id}: {row.consumer} returned a {result['returned']} instead of refusing "
        "the bad input"
    )
    assert result["expected_class"], (
        f"{row.id}: raised {result['raised']}, expected {row.error.__name__}: "
        f"{result['message']}\n{result['traceback']}"
    )
    message = result["message"]
    assert outcome.path.name in message, f"{row.id}: message does not name {outcome.path.name}"
    assert re.search(row.message, message), (
        f"{row.id}: message does not match {row.message!r}:\n{message}"
    )
    problem = row.leaves_nothing(outcome.folder, outcome.snapshot)
    assert problem is None, f"{row.id}: {problem}"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_rows(ROWS, tmp_path_factory.mktemp("bad_inputs"))


def test_row_ids_are_unique():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row, outcomes):
    check_row(row, outcomes[row.id])


def test_the_table_fails_rows_whose_fault_is_not_handled(tmp_path):
    """The runner is honest: a hidden allocation, a silent success, a vague message or a
    leftover file each fail their row."""

    def leftover(folder):
        return write_nifti(folder / "ok.nii.gz", _volume(), KITS)

    def left_file(folder, before):
        (folder / "partial.tmp").write_bytes(b"half")  # what a leaky consumer would leave
        return _same_files(folder, before)

    rows = [
        # 8 GiB allocated before any check: the limit turns it into a MemoryError.
        BadInput("hidden-allocation", small_nifti, "numpy:ones", "", args=([1024] * 3,)),
        BadInput("silent-success", small_nifti, READ_NIFTI, "small"),
        BadInput(
            "vague-message",
            small_nifti,
            READ_NIFTI,
            r"small\.nii\.gz: bad",
            kwargs={"max_voxels": 1},
        ),
        BadInput(
            "wrong-class", small_nifti, READ_NIFTI, "", error=TypeError, kwargs={"max_voxels": 1}
        ),
        BadInput(
            "leaves-a-file",
            leftover,
            READ_NIFTI,
            "ok",
            kwargs={"max_voxels": 1},
            leaves_nothing=left_file,
        ),
    ]
    results = run_rows(rows, tmp_path)
    assert results["hidden-allocation"].child["memory_error"]
    expected = {
        "hidden-allocation": "MemoryError, expected MedsegIOError",
        "silent-success": "returned a tuple instead of refusing",
        "vague-message": "message does not match",
        "wrong-class": "expected TypeError",
        "leaves-a-file": "added ['partial.tmp']",
    }
    for row in rows:
        with pytest.raises(AssertionError, match=re.escape(expected[row.id])):
            check_row(row, results[row.id])
