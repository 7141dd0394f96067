"""medseg.io.nifti: geometry-preserving round trips and clear errors on bad files."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from medseg.io import (
    MedsegIOError,
    kits19_affine,
    read_nifti,
    read_nifti_case,
    write_like,
    write_nifti,
)

LPS = np.diag([-0.8, -0.9, 2.5, 1.0])
LPS[:3, 3] = (120.0, 95.0, -40.0)
RAS = np.diag([0.8, 0.9, 2.5, 1.0])
RAS[:3, 3] = (-120.0, -95.0, 40.0)
KITS = kits19_affine((3.0, 0.78, 0.78))
AFFINES = {"ras": RAS, "lps": LPS, "kits19": KITS}


def _volume(shape=(4, 5, 6), dtype=np.int16):
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_keeps_array_affine_and_orientation(tmp_path, name, suffix):
    affine = AFFINES[name]
    array = _volume()
    path = write_nifti(tmp_path / f"vol{suffix}", array, affine)
    read, read_affine, header = read_nifti(path)
    np.testing.assert_array_equal(read, array)
    assert read.dtype == np.int16
    np.testing.assert_allclose(read_affine, affine, atol=1e-5)
    assert nib.aff2axcodes(read_affine) == nib.aff2axcodes(affine)
    # Both forms hold the affine, so tools preferring either agree.
    assert int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)


def test_kits19_orientation_is_not_ras():
    # Guards the parametrisation: the three affines really are different orientations.
    codes = {name: nib.aff2axcodes(a) for name, a in AFFINES.items()}
    assert codes == {
        "ras": ("R", "A", "S"),
        "lps": ("L", "P", "S"),
        "kits19": ("I", "P", "L"),
    }


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_bright_voxel_keeps_its_world_position(tmp_path, name):
    affine = AFFINES[name]
    array = np.zeros((7, 8, 9), dtype=np.uint8)
    index = (2, 5, 7)
    array[index] = 255
    world = affine @ [*index, 1]
    read, read_affine, _ = read_nifti(write_nifti(tmp_path / "dot.nii.gz", array, affine))
    found = np.argwhere(read == 255)
    assert found.tolist() == [list(index)]
    np.testing.assert_allclose(read_affine @ [*found[0], 1], world, atol=1e-4)


def test_four_d_is_channels_last(tmp_path):
    array = _volume((3, 4, 5, 2)).astype(np.float32)
    read, _, _ = read_nifti(write_nifti(tmp_path / "multi.nii.gz", array, RAS))
    assert read.shape == (3, 4, 5, 2)
    np.testing.assert_array_equal(read, array)


def _qform_only_reference(path, array, affine):
    """A KiTS19-style segmentation: uint16, qform_code=1, sform_code=0."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint16)
    header.set_qform(affine, code=1)
    header.set_sform(np.zeros((4, 4)), code=0)
    header.set_xyzt_units("mm", "sec")
    img = nib.Nifti1Image(array.astype(np.uint16), None, header=header)
    nib.save(img, path)
    return path


def test_qform_only_file_gets_the_qform_affine(tmp_path):
    ref = _qform_only_reference(tmp_path / "seg.nii.gz", np.ones((3, 4, 5)), KITS)
    raw = nib.load(ref)
    assert int(raw.header["sform_code"]) == 0 and int(raw.header["qform_code"]) == 1
    array, affine, _ = read_nifti(ref)
    np.testing.assert_allclose(affine, KITS, atol=1e-5)
    assert array.dtype == np.uint16


def test_write_like_qform_only_reference_keeps_affine_and_codes(tmp_path):
    ref = _qform_only_reference(tmp_path / "segmentation.nii.gz", np.ones((3, 4, 5)), KITS)
    ref_img = nib.load(ref)
    prediction = np.zeros((3, 4, 5), dtype=np.uint8)
    prediction[1, 2, 3] = 2
    out = write_like(tmp_path / "prediction.nii.gz", prediction, ref)
    out_img = nib.load(out)
    np.testing.assert_array_equal(out_img.affine, ref_img.affine)
    assert int(out_img.header["qform_code"]) == 1
    assert int(out_img.header["sform_code"]) == 0
    assert out_img.header.get_xyzt_units() == ref_img.header.get_xyzt_units()
    np.testing.assert_allclose(out_img.header.get_zooms(), ref_img.header.get_zooms())
    array, _, header = read_nifti(out)
    assert header.get_data_dtype() == np.uint8  # dtype follows the array, not the reference
    np.testing.assert_array_equal(array, prediction)


def test_write_like_keeps_reference_codes_and_rejects_other_grid(tmp_path):
    image = write_nifti(tmp_path / "imaging.nii.gz", _volume(), LPS)
    out = write_like(tmp_path / "pred.nii.gz", np.ones((4, 5, 6), np.float32), image)
    a, b = nib.load(image).header, nib.load(out).header
    for key in ("qform_code", "sform_code", "pixdim", "xyzt_units", "srow_x", "quatern_b"):
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(MedsegIOError, match=r"pred2\.nii\.gz.*not on the grid"):
        write_like(tmp_path / "pred2.nii.gz", np.ones((4, 5, 7)), image)


def test_scaled_data_is_applied_and_unscaled_keeps_integer_dtype(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, RAS, dtype=np.int16)
    img.header.set_slope_inter(2.0, -10.0)
    nib.save(img, tmp_path / "scaled.nii")
    array, _, _ = read_nifti(tmp_path / "scaled.nii")
    assert array.dtype.kind == "f"
    np.testing.assert_allclose(array, raw * 2.0 - 10.0)

    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, tmp_path / "plain.nii")
    array, _, _ = read_nifti(tmp_path / "plain.nii")
    assert array.dtype == np.int16
    np.testing.assert_array_equal(array, raw)


def test_big_endian_file_reads_native(tmp_path):
    raw = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    header = nib.Nifti1Header(endianness=">")
    nib.save(nib.Nifti1Image(raw, RAS, header=header), tmp_path / "be.nii")
    array, _, _ = read_nifti(tmp_path / "be.nii")
    assert array.dtype.isnative
    np.testing.assert_array_equal(array, np.arange(24).reshape(2, 3, 4))


def test_write_is_atomic(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "keep.nii.gz", _volume(), RAS)
    before = path.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(path, np.zeros((4, 5, 6), np.int16), RAS)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nii.gz"]


def test_written_file_has_the_umask_mode_not_mkstemps_0600(tmp_path):
    previous = os.umask(0o027)
    try:
        path = write_nifti(tmp_path / "shared.nii.gz", _volume(), RAS)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_write_rejects_other_suffix(tmp_path):
    with pytest.raises(MedsegIOError, match=r"vol\.npy.*\.nii"):
        write_nifti(tmp_path / "vol.npy", _volume(), RAS)


# --- bad input -------------------------------------------------------------------------


def test_truncated_gz_is_a_clear_error(tmp_path):
    path = write_nifti(tmp_path / "imaging.nii.gz", _volume((20, 20, 20)), KITS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedsegIOError, match=r"imaging\.nii\.gz: truncated or corrupt \("):
        read_nifti(path)


def test_truncated_header_and_garbage_are_clear_errors(tmp_path):
    path = write_nifti(tmp_path / "imaging.nii.gz", _volume(), KITS)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(MedsegIOError, match=r"imaging\.nii\.gz: truncated or corrupt"):
        read_nifti(path)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 3))
    with pytest.raises(MedsegIOError, match=r"garbage\.nii\.gz: truncated or corrupt"):
        read_nifti(garbage)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MedsegIOError, match=r"nope\.nii\.gz: no such file"):
        read_nifti(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize(
    ("header_class", "shape", "offset"),
    [(nib.Nifti1Header, (30000, 30000, 30000), 352), (nib.Nifti2Header, (10**5,) * 3, 544)],
)
def test_huge_header_shape_rejected_before_allocating(tmp_path, header_class, shape, offset):
    header = header_class()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header.set_data_offset(offset)
    header.set_qform(np.eye(4), code=1)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\x00" * (offset - f.tell()) + b"garbage" * 10)
    start = time.perf_counter()
    with pytest.raises(MedsegIOError, match=r"huge\.nii: header claims shape .*max_voxels"):
        read_nifti(path)
    assert time.perf_counter() - start < 2.0


def test_max_voxels_is_honoured(tmp_path):
    path = write_nifti(tmp_path / "small.nii", _volume(), RAS)
    with pytest.raises(MedsegIOError, match=r"small\.nii: header claims shape \(4, 5, 6\)"):
        read_nifti(path, max_voxels=100)


# --- read_nifti_case -------------------------------------------------------------------


def _case(tmp_path, image=None, label=None, image_affine=KITS, label_affine=KITS):
    image = _volume() if image is None else image
    label = np.zeros(image.shape[:3], np.uint16) if label is None else label
    image_path = write_nifti(tmp_path / "imaging.nii.gz", image, image_affine)
    label_path = write_nifti(tmp_path / "segmentation.nii.gz", label, label_affine)
    return image_path, label_path


def test_case_reads_image_label_and_spacing(tmp_path):
    label = np.zeros((4, 5, 6), np.uint16)
    label[1:3, 2:4, 3:5] = 2
    image_path, label_path = _case(tmp_path, label=label)
    record = read_nifti_case("case_00007", image_path, label_path, num_classes=3)
    assert record.case_id == "case_00007"
    assert record.image.shape == (4, 5, 6) and record.image.dtype == np.int16
    assert record.label.dtype == np.uint8
    np.testing.assert_array_equal(record.label, label)
    np.testing.assert_allclose(record.spacing, (3.0, 0.78, 0.78), atol=1e-5)
    assert isinstance(record.spacing, tuple)
    np.testing.assert_allclose(record.affine, KITS, atol=1e-5)
    assert "imaging.nii.gz" in record.source and "segmentation.nii.gz" in record.source


def test_case_label_with_qform_only_matches_image(tmp_path):
    image_path = write_nifti(tmp_path / "imaging.nii.gz", _volume(), KITS)
    label_path = _qform_only_reference(tmp_path / "segmentation.nii.gz", np.ones((4, 5, 6)), KITS)
    record = read_nifti_case("case_00160", image_path, label_path, num_classes=3)
    assert record.label.dtype == np.uint8 and record.label.max() == 1


def test_case_shape_mismatch(tmp_path):
    image_path, label_path = _case(tmp_path, label=np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(
        MedsegIOError, match=r"case 'c1': .*segmentation\.nii\.gz: label shape \(4, 5, 7\)"
    ):
        read_nifti_case("c1", image_path, label_path)


def test_case_affine_mismatch(tmp_path):
    shifted = KITS.copy()
    shifted[0, 3] += 1.0
    image_path, label_path = _case(tmp_path, label_affine=shifted)
    with pytest.raises(MedsegIOError, match=r"case 'c1': .*segmentation\.nii\.gz: label affine"):
        read_nifti_case("c1", image_path, label_path)


def test_case_label_outside_declared_classes(tmp_path):
    label = np.zeros((4, 5, 6), np.uint8)
    label[0, 0, 0] = 3
    image_path, label_path = _case(tmp_path, label=label)
    with pytest.raises(
        MedsegIOError, match=r"segmentation\.nii\.gz: label values \[3\] outside declared"
    ):
        read_nifti_case("c1", image_path, label_path, num_classes=3)


def test_case_non_integer_label(tmp_path):
    label = np.zeros((4, 5, 6), np.float32)
    label[0, 0, 0] = 0.5
    image_path, label_path = _case(tmp_path, label=label)
    with pytest.raises(MedsegIOError, match=r"segmentation\.nii\.gz: label has non-integer"):
        read_nifti_case("c1", image_path, label_path)


def test_case_nan_intensities(tmp_path):
    image = _volume().astype(np.float32)
    image[1, 1, 1] = np.nan
    image_path, label_path = _case(tmp_path, image=image)
    with pytest.raises(MedsegIOError, match=r"case 'c1': .*imaging\.nii\.gz: image has 1 NaN"):
        read_nifti_case("c1", image_path, label_path)


def test_case_missing_label_file(tmp_path):
    image_path = write_nifti(tmp_path / "imaging.nii.gz", _volume(), KITS)
    with pytest.raises(
        MedsegIOError, match=r"case 'c1': .*segmentation\.nii\.gz: label file does not exist"
    ):
        read_nifti_case("c1", image_path, tmp_path / "segmentation.nii.gz")


def test_case_without_label(tmp_path):
    image_path = write_nifti(tmp_path / "imaging.nii.gz", _volume(), KITS)
    record = read_nifti_case("c1", image_path)
    assert record.label is None


def test_case_truncated_image_names_case_and_file(tmp_path):
    image_path, label_path = _case(
        tmp_path, image=_volume((20, 20, 20)), label=np.zeros((20, 20, 20), np.uint8)
    )
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedsegIOError, match=r"case 'c1': .*imaging\.nii\.gz: truncated or corrupt"):
        read_nifti_case("c1", image_path, label_path)


# --- bytes, not voxels -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "slope", "inter"),
    [(np.int16, 1.0, 0.0), (np.int16, 2.0, -10.0), (np.uint8, 0.5, 0.0), (np.float32, 1.0, 0.0)],
)
def test_byte_limit_is_the_returned_arrays_size(tmp_path, dtype, slope, inter):
    # Scaled files come back as nibabel's float: the limit counts those bytes, not the disk's.
    img = nib.Nifti1Image(np.ones((4, 5, 6), dtype), RAS, dtype=dtype)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / "vol.nii.gz")
    expected = np.asanyarray(nib.load(tmp_path / "vol.nii.gz").dataobj)
    array, _, _ = read_nifti(tmp_path / "vol.nii.gz", max_bytes=expected.nbytes)
    assert array.dtype == expected.dtype
    with pytest.raises(
        MedsegIOError,
        match=rf"vol\.nii\.gz: header claims shape \(4, 5, 6\) of {expected.dtype} = "
        rf"{expected.nbytes} bytes .*more than max_bytes={expected.nbytes - 1} ",
    ):
        read_nifti(tmp_path / "vol.nii.gz", max_bytes=expected.nbytes - 1)


def test_byte_limit_from_environment(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "vol.nii", _volume(), RAS)  # 120 voxels x 2 B
    monkeypatch.setenv("MEDSEG_MAX_IMAGE_BYTES", "240")
    assert read_nifti(path)[0].nbytes == 240
    monkeypatch.setenv("MEDSEG_MAX_IMAGE_BYTES", "239")
    with pytest.raises(MedsegIOError, match=r"max_bytes=239 .*MEDSEG_MAX_IMAGE_BYTES"):
        read_nifti(path)
    assert read_nifti(path, max_bytes=240)[0].nbytes == 240  # the argument wins
    for text in ("lots", "0", "-5"):
        monkeypatch.setenv("MEDSEG_MAX_IMAGE_BYTES", text)
        with pytest.raises(ValueError, match=r"MEDSEG_MAX_IMAGE_BYTES=.*positive number"):
            read_nifti(path)


def test_multi_member_gzip_reads_in_full(tmp_path):
    # bgzip and "cat a.gz b.gz" make several members; the trailer (ISIZE) then counts the
    # last one only, and must not make a complete file look short.
    array = np.arange(32 * 32 * 32, dtype=np.int16).reshape(32, 32, 32)
    raw = write_nifti(tmp_path / "vol.nii", array, RAS).read_bytes()
    path = tmp_path / "members.nii.gz"
    path.write_bytes(b"".join(gzip.compress(raw[i : i + 10000]) for i in range(0, len(raw), 10000)))
    assert int.from_bytes(path.read_bytes()[-4:], "little") < len(raw)
    read, affine, _ = read_nifti(path)
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(affine, RAS, atol=1e-5)


def test_complete_file_with_trailing_bytes_still_reads(tmp_path):
    path = write_nifti(tmp_path / "vol.nii", _volume(), RAS)
    path.write_bytes(path.read_bytes() + b"\x00" * 16)  # some writers pad the file
    np.testing.assert_array_equal(read_nifti(path)[0], _volume())


def test_out_of_memory_is_a_clear_error(tmp_path):
    # A file under the byte limit that this process cannot hold: limit the child's address
    # space to what it uses after a warm-up read plus 8 MiB, and read 16 MiB.
    big = write_nifti(tmp_path / "big.nii.gz", np.zeros((128, 128, 128)), RAS)
    small = write_nifti(tmp_path / "small.nii.gz", _volume(), RAS)
    code = (
        "import resource, sys\n"
        "from medseg.io import MedsegIOError, read_nifti\n"
        "read_nifti(sys.argv[2])\n"
        "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status')"
        " if l.startswith('VmSize'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 8 * 2**20, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    read_nifti(sys.argv[1])\n"
        "except MedsegIOError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(big), str(small)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"{big}: out of memory reading shape (128, 128, 128) of float64" in result.stdout


def test_case_passes_limits_to_both_files(tmp_path):
    thick = kits19_affine((40.0, 0.8, 0.8))
    image = np.ones((4, 5, 6), np.uint8)  # 120 bytes; the uint16 label is 240
    image_path, label_path = _case(tmp_path, image=image, image_affine=thick, label_affine=thick)
    with pytest.raises(MedsegIOError, match=r"case 'c1': .*imaging\.nii\.gz: implausible"):
        read_nifti_case("c1", image_path, label_path)
    record = read_nifti_case("c1", image_path, label_path, spacing_range_mm=(0.1, 50.0))
    np.testing.assert_allclose(record.spacing, (40.0, 0.8, 0.8), atol=1e-5)
    with pytest.raises(MedsegIOError, match=r"segmentation\.nii\.gz: header claims .*uint16"):
        read_nifti_case("c1", image_path, label_path, spacing_range_mm=(0.1, 50.0), max_bytes=200)
