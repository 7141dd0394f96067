"""medseg.io.image2d: 2D images become one-slice volumes."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from medseg.io import MedsegIOError, read_image2d, read_image2d_case


def test_grayscale_png_is_one_slice(tmp_path):
    image = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    iio.imwrite(tmp_path / "img.png", image)
    array = read_image2d(tmp_path / "img.png")
    assert array.shape == (1, 12, 10) and array.dtype == np.uint8
    np.testing.assert_array_equal(array[0], image)


def test_rgb_png_and_16bit_tiff(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image2d(tmp_path / "rgb.png"), rgb[None])
    deep = np.arange(30, dtype=np.uint16).reshape(5, 6) * 1000
    iio.imwrite(tmp_path / "deep.tif", deep)
    array = read_image2d(tmp_path / "deep.tif")
    assert array.shape == (1, 5, 6) and array.dtype == np.uint16
    np.testing.assert_array_equal(array[0], deep)


def test_jpeg_reads(tmp_path):
    iio.imwrite(tmp_path / "img.jpg", np.full((8, 8), 128, np.uint8))
    array = read_image2d(tmp_path / "img.jpg")
    assert array.shape == (1, 8, 8)
    assert abs(int(array.mean()) - 128) <= 2  # lossy


def test_case_with_label_and_spacing(tmp_path):
    iio.imwrite(tmp_path / "img.png", np.zeros((6, 7, 3), np.uint8))
    mask = np.zeros((6, 7), np.uint8)
    mask[2:4, 3:5] = 1
    iio.imwrite(tmp_path / "mask.png", mask)
    record = read_image2d_case("slide1", tmp_path / "img.png", tmp_path / "mask.png", (0.5, 0.25))
    assert record.image.shape == (1, 6, 7, 3)
    assert record.label.shape == (1, 6, 7) and record.label.dtype == np.uint8
    np.testing.assert_array_equal(record.label[0], mask)
    assert record.spacing == (1.0, 0.5, 0.25)
    np.testing.assert_array_equal(record.affine, np.diag([1.0, 0.5, 0.25, 1.0]))


def test_case_label_shape_mismatch(tmp_path):
    iio.imwrite(tmp_path / "img.png", np.zeros((6, 7), np.uint8))
    iio.imwrite(tmp_path / "mask.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(MedsegIOError, match=r"case 's': .*mask\.png: label shape \(6, 8\)"):
        read_image2d_case("s", tmp_path / "img.png", tmp_path / "mask.png")


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(MedsegIOError, match=r"bad\.png: cannot read image"):
        read_image2d(tmp_path / "bad.png")
    with pytest.raises(MedsegIOError, match=r"none\.png: no such file"):
        read_image2d(tmp_path / "none.png")
