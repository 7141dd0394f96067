"""medseg.io.dicom on pydicom's shipped CT series, and on copies with edited tags."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.io import MedsegIOError, list_dicom_series, read_dicom_series

DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests"
CT5N = DICOMDIR_TESTS / "98892001/CT5N"
CT2 = DICOMDIR_TESTS / "77654033/CT2"


def _headers(folder):
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def _copy(folder, tmp_path, name="series"):
    dest = tmp_path / name
    shutil.copytree(folder, dest)
    return dest


def test_ct5n_is_sorted_by_position_not_instance_number():
    record = read_dicom_series(CT5N)
    assert record.case_id == "CT5N"
    assert record.image.shape == (5, 16, 16)
    headers = _headers(CT5N)
    normal = np.cross(
        np.asarray(headers[0].ImageOrientationPatient[:3], float),
        np.asarray(headers[0].ImageOrientationPatient[3:], float),
    )
    by_position = sorted(headers, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    along = [float(np.dot(d.ImagePositionPatient, normal)) for d in by_position]
    assert np.all(np.diff(along) > 0)
    # In this series z falls as InstanceNumber rises, so the two orders differ.
    by_instance = sorted(headers, key=lambda d: int(d.InstanceNumber))
    assert [d.SOPInstanceUID for d in by_position] != [d.SOPInstanceUID for d in by_instance]
    for k, ds in enumerate(by_position):
        # Slice k holds the k-th file in position order ...
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(record.image[k], hu)
        # ... and the affine's slice column puts index k at that file's position (LPS->RAS).
        lps = np.asarray(ds.ImagePositionPatient, float)
        np.testing.assert_allclose(record.affine @ [k, 0, 0, 1], [-lps[0], -lps[1], lps[2], 1])


def test_ct5n_hu_dtype_spacing_and_affine():
    record = read_dicom_series(CT5N)
    ds = pydicom.dcmread(CT5N / "2062")
    stored = int(ds.pixel_array[3, 7])
    hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    k = 4  # 2062 sits highest along the normal (z = 8.7625), so it is the last slice
    assert record.image[k, 3, 7] == hu
    assert record.image.dtype == np.int16
    assert float(ds.RescaleIntercept) == -1024.0 and record.image.min() < 0
    np.testing.assert_allclose(record.spacing, (2.5, 0.488281, 0.488281), atol=1e-6)
    # Pixel (row 3, col 7) in world: origin + row * col_cos * dr + col * row_cos * dc.
    lps = np.asarray(ds.ImagePositionPatient, float)
    lps = lps + 3 * 0.488281 * np.array([0, 1, 0]) + 7 * 0.488281 * np.array([1, 0, 0])
    np.testing.assert_allclose(record.affine @ [k, 3, 7, 1], [-lps[0], -lps[1], lps[2], 1])


def test_ct2_gap_is_a_clear_error():
    with pytest.raises(MedsegIOError) as info:
        read_dicom_series(CT2)
    message = str(info.value)
    assert str(CT2) in message and "non-uniform slice spacing" in message
    # The positions around the gap: z = -99.48 then 103.02.
    assert "-99.48" in message and "103.01" in message


def test_skips_non_dicom_files(tmp_path):
    folder = _copy(CT5N, tmp_path)
    (folder / "README.txt").write_text("not dicom")
    shutil.copy(DICOMDIR_TESTS / "DICOMDIR", folder / "DICOMDIR")
    record = read_dicom_series(folder)
    assert record.image.shape == (5, 16, 16)
    assert [len(v) for v in list_dicom_series(folder).values()] == [5]


def test_sort_ignores_file_names(tmp_path):
    folder = _copy(CT5N, tmp_path)
    # Rename so file-name order is the reverse of the original file-name order.
    for i, path in enumerate(sorted(folder.iterdir())):
        path.rename(folder / f"z{9 - i}.dcm")
    np.testing.assert_array_equal(read_dicom_series(folder).image, read_dicom_series(CT5N).image)


def test_mixed_series_lists_uids_and_series_uid_selects(tmp_path):
    folder = _copy(CT5N, tmp_path)
    odd = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(odd)
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.save_as(odd)
    original_uid = str(pydicom.dcmread(CT5N / "2392").SeriesInstanceUID)
    with pytest.raises(MedsegIOError, match="mixed series") as info:
        read_dicom_series(folder)
    assert "1.2.3.4.5" in str(info.value) and original_uid in str(info.value)
    assert str(folder) in str(info.value)
    series = list_dicom_series(folder)
    assert {uid: len(paths) for uid, paths in series.items()} == {"1.2.3.4.5": 1, original_uid: 4}
    assert read_dicom_series(folder, series_uid=original_uid).image.shape == (4, 16, 16)


def test_duplicate_position_is_an_error(tmp_path):
    folder = _copy(CT5N, tmp_path)
    ds = pydicom.dcmread(folder / "2392")
    ds.ImagePositionPatient = pydicom.dcmread(folder / "2693").ImagePositionPatient
    ds.save_as(folder / "2392")
    with pytest.raises(MedsegIOError, match="duplicate slice position") as info:
        read_dicom_series(folder)
    assert str(folder) in str(info.value)
    assert "2392" in str(info.value) and "2693" in str(info.value)


def test_differing_orientation_is_an_error(tmp_path):
    folder = _copy(CT5N, tmp_path)
    ds = pydicom.dcmread(folder / "3023")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(folder / "3023")
    with pytest.raises(MedsegIOError, match="different ImageOrientationPatient") as info:
        read_dicom_series(folder)
    assert str(folder) in str(info.value)


def test_fractional_rescale_gives_float32(tmp_path):
    folder = _copy(CT5N, tmp_path)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = 0.5
        ds.save_as(path)
    record = read_dicom_series(folder)
    assert record.image.dtype == np.float32
    ds = pydicom.dcmread(folder / "2062")
    assert record.image[4, 0, 1] == ds.pixel_array[0, 1] * 0.5 - 1024


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(MedsegIOError, match="no DICOM image files"):
        read_dicom_series(tmp_path)


def test_shipped_folders_with_real_problems():
    # Sibling folders in pydicom's data already hold the failure cases seen in the wild.
    with pytest.raises(MedsegIOError, match="different ImageOrientationPatient"):
        read_dicom_series(DICOMDIR_TESTS / "98892001/CT2N")  # one series, two orientations
    with pytest.raises(MedsegIOError, match="mixed series, 3 SeriesInstanceUIDs"):
        read_dicom_series(DICOMDIR_TESTS / "98892003/MR2")
    with pytest.raises(MedsegIOError, match="missing ImageOrientationPatient"):
        read_dicom_series(DICOMDIR_TESTS / "77654033/CR1")  # a radiograph has no 3D geometry


def test_single_slice_uses_slice_thickness(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(CT5N / "2062", folder / "2062")
    record = read_dicom_series(folder)
    assert record.image.shape == (1, 16, 16)
    np.testing.assert_allclose(record.spacing, (2.5, 0.488281, 0.488281), atol=1e-6)


# --- limits and staging ----------------------------------------------------------------


def _synthetic_series(folder, n_slices=20, size=256, slope=1.0):
    """``n_slices`` CT slices of ``size`` x ``size`` built from one CT5N file; returns the
    stored pixel values in slice order."""
    folder.mkdir()
    template = pydicom.dcmread(CT5N / "2062")
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2000, size=(n_slices, size, size)).astype(np.int16)
    for k in range(n_slices):
        ds = copy.deepcopy(template)
        ds.Rows = ds.Columns = size
        ds.PixelData = stored[k].tobytes()
        ds.SOPInstanceUID = f"{template.SOPInstanceUID}.{k}"
        ds.ImagePositionPatient = [-72.2, -143.0, 2.5 * k]
        ds.RescaleSlope = slope
        ds.save_as(folder / f"slice{k:03d}.dcm")
    return stored


@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_series_is_staged_in_float32_not_float64(tmp_path, slope):
    import tracemalloc

    stored = _synthetic_series(tmp_path / "s", slope=slope)
    expected = stored * slope - 1024.0
    tracemalloc.start()
    try:
        record = read_dicom_series(tmp_path / "s")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert record.image.dtype == (np.int16 if slope == 1.0 else np.float32)
    np.testing.assert_array_equal(record.image, expected.astype(record.image.dtype))
    # float32 staging + int16 result = 6 B/voxel, plus one slice's temporaries and the
    # headers held from the scan (~100 kB per CT5N file, ~2 B/voxel here); a float64
    # volume (slices + their stack + its rounding) was 26 B/voxel on this series.
    assert peak < 10 * stored.size, f"peak {peak / stored.size:.1f} B/voxel"


def test_limits_are_checked_from_headers_and_can_be_raised(tmp_path):
    folder = _copy(CT5N, tmp_path)  # 5 x 16 x 16 = 1280 voxels = 5120 B as float32
    assert read_dicom_series(folder, max_bytes=5120, max_voxels=1280).image.shape == (5, 16, 16)
    with pytest.raises(MedsegIOError, match=r"16 x 5 slices = 5120 bytes as float32 .*=5119;"):
        read_dicom_series(folder, max_bytes=5119)
    with pytest.raises(MedsegIOError, match=r"1280 voxels, more than max_voxels=1279"):
        read_dicom_series(folder, max_voxels=1279)


def test_micro_scale_and_thick_slices_pass_outside_range_refused(tmp_path):
    folder = _copy(CT5N, tmp_path)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [0.3, 0.3]
        ds.save_as(path)
    np.testing.assert_allclose(read_dicom_series(folder).spacing, (2.5, 0.3, 0.3))
    with pytest.raises(MedsegIOError, match=r"implausible voxel spacing .*allowed 0\.5\.\.10 mm"):
        read_dicom_series(folder, spacing_range_mm=(0.5, 10.0))


def test_file_missing_rows_is_an_error_not_skipped(tmp_path):
    # Skipping it would silently drop a slice from the volume.
    folder = _copy(CT5N, tmp_path)
    ds = pydicom.dcmread(folder / "2693")
    del ds.Rows
    ds.save_as(folder / "2693")
    assert [len(v) for v in list_dicom_series(folder).values()] == [5]
    with pytest.raises(MedsegIOError, match=r"2693: missing Rows \(0028,0010\)"):
        read_dicom_series(folder)
