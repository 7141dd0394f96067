"""medseg.io.read_case dispatches on the path and validates DICOM + NIfTI label pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pydicom
import pytest

from medseg.io import (
    MedsegIOError,
    kits19_affine,
    read_case,
    read_dicom_series,
    write_nifti,
)

CT5N = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892001/CT5N"


def test_nifti_case(tmp_path):
    affine = kits19_affine((3.0, 0.8, 0.8))
    image = write_nifti(tmp_path / "imaging.nii.gz", np.zeros((3, 4, 5), np.int16), affine)
    label = write_nifti(tmp_path / "segmentation.nii", np.ones((3, 4, 5), np.uint16), affine)
    record = read_case("case_00001", image, label, num_classes=2)
    assert record.case_id == "case_00001"
    assert record.label.dtype == np.uint8 and record.label.shape == (3, 4, 5)
    with pytest.raises(MedsegIOError, match=r"segmentation\.nii: label values \[1\]"):
        read_case("case_00001", image, label, num_classes=1)


def test_dicom_case_with_nifti_label_on_its_grid(tmp_path):
    series = read_dicom_series(CT5N)
    label = np.zeros(series.image.shape, np.uint8)
    label[2, 4:8, 4:8] = 1
    label_path = write_nifti(tmp_path / "seg.nii.gz", label, series.affine)
    record = read_case("ct", CT5N, label_path, num_classes=2)
    assert record.case_id == "ct"
    np.testing.assert_array_equal(record.label, label)
    np.testing.assert_array_equal(record.image, series.image)


def test_dicom_case_label_on_other_grid(tmp_path):
    series = read_dicom_series(CT5N)
    wrong_shape = write_nifti(tmp_path / "seg.nii.gz", np.zeros((16, 16, 5), np.uint8), np.eye(4))
    with pytest.raises(MedsegIOError, match=r"seg\.nii\.gz: label shape \(16, 16, 5\)"):
        read_case("ct", CT5N, wrong_shape)
    wrong_affine = write_nifti(tmp_path / "seg2.nii.gz", np.zeros((5, 16, 16), np.uint8), np.eye(4))
    with pytest.raises(MedsegIOError, match=r"seg2\.nii\.gz: label affine differs"):
        read_case("ct", CT5N, wrong_affine)
    assert series.label is None


def test_dicom_label_must_be_nifti(tmp_path):
    iio.imwrite(tmp_path / "seg.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(MedsegIOError, match=r"seg\.png: labels of a DICOM series must be"):
        read_case("ct", CT5N, tmp_path / "seg.png")


def test_image2d_case(tmp_path):
    iio.imwrite(tmp_path / "img.PNG", np.zeros((4, 5), np.uint8))
    iio.imwrite(tmp_path / "mask.png", np.full((4, 5), 3, np.uint8))
    record = read_case("p", tmp_path / "img.PNG", tmp_path / "mask.png")
    assert record.image.shape == (1, 4, 5) and record.label.max() == 3
    with pytest.raises(MedsegIOError, match=r"mask\.png: label values \[3\] outside declared"):
        read_case("p", tmp_path / "img.PNG", tmp_path / "mask.png", num_classes=3)


def test_unknown_extension(tmp_path):
    path = tmp_path / "volume.mha"
    path.write_bytes(b"whatever")
    with pytest.raises(MedsegIOError, match=r"case 'x': .*volume\.mha: unknown extension \.mha"):
        read_case("x", path)


def test_missing_path(tmp_path):
    with pytest.raises(MedsegIOError, match=r"gone\.npz: no such file"):
        read_case("x", tmp_path / "gone.npz")


def test_dicom_folder_copy_keeps_case_id(tmp_path):
    folder = tmp_path / "patient7"
    shutil.copytree(CT5N, folder)
    assert read_case("patient7-ct", folder).case_id == "patient7-ct"


def test_dicom_label_file_errors_name_the_case(tmp_path):
    series = read_dicom_series(CT5N)
    flat = series.affine.copy()
    flat[:3, 0] *= 1e-6  # slice axis squashed to 2.5 nm: a corrupt label header
    label = write_nifti(tmp_path / "seg.nii.gz", np.zeros(series.image.shape, np.uint8), flat)
    with pytest.raises(
        MedsegIOError, match=r"^case 'ct': .*seg\.nii\.gz: implausible voxel spacing \[2\.5e-06"
    ):
        read_case("ct", CT5N, label)
