"""Overlay frames, GIFs and learning-curve plots, read back from disk."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from medseg.evaluation import overlay_frames, plot_learning_curves, visuals, write_overlay_gif

SHAPE = (5, 6, 7)
GAP = 2
KIDNEY_VOXEL = (2, 3, 4)
TUMOR_VOXEL = (2, 1, 5)


@pytest.fixture
def case():
    # intensities differ per slice so that no two GIF frames are identical (Pillow merges
    # identical consecutive frames)
    image = np.linspace(0.0, 1.0, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    truth = np.zeros(SHAPE, dtype=np.uint8)
    truth[KIDNEY_VOXEL] = 1
    pred = np.zeros(SHAPE, dtype=np.int64)
    pred[TUMOR_VOXEL] = 2
    return image, truth, pred


def panel_pixel(frames, frame, row, col, panel, width):
    return frames[frame, row, panel * (width + GAP) + col, :3].astype(int)


def is_red(rgb):
    return rgb[0] > rgb[1] + 60 and rgb[0] > rgb[2] + 60


def is_blue(rgb):
    return rgb[2] > rgb[0] + 60 and rgb[2] > rgb[1] + 60


def is_gray(rgb):
    return max(rgb) - min(rgb) <= 2


def test_overlay_frames_layout_and_colours(case):
    image, truth, pred = case
    frames = overlay_frames(image, truth, pred, gap=GAP)
    depth, height, width = SHAPE
    assert frames.shape == (depth, height, 3 * width + 2 * GAP, 3)
    assert frames.dtype == np.uint8

    frame, row, col = KIDNEY_VOXEL
    assert is_red(panel_pixel(frames, frame, row, col, 1, width))  # ground truth: kidney
    assert is_gray(panel_pixel(frames, frame, row, col, 0, width))  # plain image
    assert is_gray(panel_pixel(frames, frame, row, col, 2, width))  # not predicted
    frame, row, col = TUMOR_VOXEL
    assert is_blue(panel_pixel(frames, frame, row, col, 2, width))  # prediction: tumour
    assert is_gray(panel_pixel(frames, frame, row, col, 1, width))

    # outside the labels every panel is the windowed image, identical across panels
    mask = np.ones((height, width), dtype=bool)
    mask[KIDNEY_VOXEL[1:]] = mask[TUMOR_VOXEL[1:]] = False
    for panel in (1, 2):
        start = panel * (width + GAP)
        np.testing.assert_array_equal(
            frames[:, :, start : start + width][:, mask], frames[:, :, :width][:, mask]
        )
    # the separators are white
    assert (frames[:, :, width : width + GAP] == 255).all()


def test_overlay_frames_window_axis_and_spacing(case):
    image, truth, pred = case
    frames = overlay_frames(image, None, pred, axis=2, window=(0.0, 1.0), gap=GAP)
    assert frames.shape == (7, 5, 3 * 6 + 2 * GAP, 3)
    # with the window (0, 1), the grey value is the intensity times 255
    np.testing.assert_array_equal(
        frames[:, :, :6, 0], np.round(np.moveaxis(image, 2, 0) * 255).astype(np.uint8)
    )
    # unlabelled truth: the middle panel is the plain image
    np.testing.assert_array_equal(frames[:, :, 6 + GAP : 12 + GAP], frames[:, :, :6])
    # tumour at (d, h, w) = (2, 1, 5) is in frame w=5, row d=2, column h=1 of slices along axis 2
    assert is_blue(frames[5, 2, 2 * (6 + GAP) + 1].astype(int))

    # anisotropic spacing: rows (axis 0, 3 mm) are repeated to match columns (1.5 mm)
    stretched = overlay_frames(image, truth, pred, axis=2, spacing=(3.0, 1.5, 1.5), gap=GAP)
    assert stretched.shape == (7, 10, 3 * 6 + 2 * GAP, 3)
    np.testing.assert_array_equal(stretched[:, 0::2], stretched[:, 1::2])


def test_write_overlay_gif_reads_back(case, tmp_path):
    image, truth, pred = case
    path = write_overlay_gif(tmp_path / "reports" / "case.gif", image, truth, pred, fps=5, gap=GAP)
    assert path == tmp_path / "reports" / "case.gif"
    frames = iio.imread(path, index=None)
    depth, height, width = SHAPE
    assert frames.shape[:3] == (depth, height, 3 * width + 2 * GAP)
    assert frames.shape[3] in (3, 4)
    frame, row, col = KIDNEY_VOXEL
    assert is_red(panel_pixel(frames, frame, row, col, 1, width))
    frame, row, col = TUMOR_VOXEL
    assert is_blue(panel_pixel(frames, frame, row, col, 2, width))
    assert [p.name for p in path.parent.iterdir()] == ["case.gif"]  # no temporary files


def test_failed_write_leaves_no_file(case, tmp_path, monkeypatch):
    image, truth, pred = case
    with pytest.raises(ValueError, match="shape"):
        write_overlay_gif(tmp_path / "bad.gif", image, truth, truth[:2])

    def crash_midway(path, *args, **kwargs):
        path.write_bytes(b"GIF89a half")
        raise OSError("disk full")

    monkeypatch.setattr(visuals.iio, "imwrite", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_overlay_gif(tmp_path / "bad.gif", image, truth, pred)
    assert list(tmp_path.iterdir()) == []


def test_plot_learning_curves_writes_png(tmp_path):
    history = {
        "loss": [1.0, 0.6, 0.4, 0.35],
        "val_loss": [1.1, 0.7, 0.5, 0.45],
        "dice_kidney": [0.1, 0.5, 0.7, 0.8],
        "val_dice_kidney": [0.05, 0.4, 0.6, 0.7],
        "val_dice_tumor": [0.0, 0.1, 0.2, 0.3],
        "learning_rate": [3e-3] * 4,
    }
    path = plot_learning_curves(history, tmp_path / "curves.png")
    picture = iio.imread(path)
    assert picture.ndim == 3 and picture.shape[2] in (3, 4)
    assert picture.shape[0] > 100 and picture.shape[1] > 100
    assert picture[..., :3].std() > 0  # something is drawn
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]

    # a history without Dice metrics still plots
    plot_learning_curves({"loss": [1.0, 0.5]}, tmp_path / "loss_only.png")
    assert iio.imread(tmp_path / "loss_only.png").ndim == 3
