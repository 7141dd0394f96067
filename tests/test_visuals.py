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

    # a dataset's case: image | ground truth, the same two panels and no third
    two = overlay_frames(image, truth, None, gap=GAP, prediction_panel=False)
    assert two.shape == (depth, height, 2 * width + GAP, 3)
    np.testing.assert_array_equal(two, frames[:, :, : 2 * width + GAP])


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


def test_label_colors_are_distinct_for_many_classes():
    colors = visuals.label_colors(40)
    assert list(colors) == list(range(1, 40))
    assert colors[1] == (255, 0, 0) and colors[2] == (0, 0, 255)
    assert len(set(colors.values())) == 39


def test_overlay_draws_every_class_in_its_own_colour():
    shape = (3, 4, 12)
    image = np.zeros(shape, np.float32)
    truth = np.zeros(shape, np.uint8)
    truth[1, 2, :] = np.arange(12)  # labels 0..11 along one row
    frames = overlay_frames(image, truth, None, window=(0.0, 1.0), alpha=1.0, gap=GAP)
    colors = visuals.label_colors(12)
    width = shape[2]
    for label in range(1, 12):
        np.testing.assert_array_equal(
            panel_pixel(frames, 1, 2, label, 1, width), colors[label]
        )
    assert (panel_pixel(frames, 1, 2, 0, 1, width) == 0).all()  # background not drawn


def test_overlay_gif_along_a_chosen_axis_reads_back(case, tmp_path):
    image, truth, pred = case
    for axis in (1, 2):
        path = write_overlay_gif(tmp_path / f"axis{axis}.gif", image, truth, pred, axis=axis)
        frames = iio.imread(path, index=None)
        assert frames.shape[0] == SHAPE[axis]  # one frame per slice along the axis
    # kidney voxel (2, 3, 4) seen along axis 1: frame 3, row 2, column 4 of the truth panel
    frames = iio.imread(tmp_path / "axis1.gif", index=None)
    assert is_red(panel_pixel(frames, 3, 2, 4, 1, SHAPE[2]))


def test_slice_montage_reads_back(tmp_path):
    shape = (12, 6, 7)
    image = np.linspace(0, 1, np.prod(shape), dtype=np.float32).reshape(shape)
    truth = np.zeros(shape, np.uint8)
    truth[3:9, 2, 3] = 1  # labelled slices 3..8
    pred = np.zeros(shape, np.uint8)
    pred[5, 4, 4] = 3
    montage, indices = visuals.slice_montage(image, truth, pred, num_slices=4, columns=2, gap=3)
    assert list(indices) == [3, 5, 6, 8]  # evenly spread over the labelled slices
    path = visuals.write_slice_montage(
        tmp_path / "montage.png", image, truth, pred, num_slices=4, columns=2, gap=3
    )
    picture = iio.imread(path)
    strip = 3 * 7 + 2 * 2  # three panels with the overlay's default 2-pixel gaps
    assert picture.shape[:2] == (2 * 6 + 3, 2 * strip + 3)
    np.testing.assert_array_equal(picture[..., :3], montage)
    # cell 0 shows slice 3: kidney (row 2, column 3) red in the truth panel
    assert is_red(picture[2, 7 + 2 + 3, :3].astype(int))
    # cell 1 (top right) shows slice 5: label 3 predicted at (4, 4) in the third colour
    rgb = picture[4, strip + 3 + 2 * (7 + 2) + 4, :3].astype(int)
    assert rgb[1] > rgb[0] + 60 and rgb[1] > rgb[2] + 60  # green
    assert (picture[:, strip : strip + 3] == 255).all()  # white gap between cells


def test_metric_boxplots_and_dataset_overview_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    per_case = [
        {"case_id": f"c{i}", "dice_kidney": rng.random(), "dice_tumor": rng.random(),
         "hd95_kidney": 10 * rng.random(), "hd95_tumor": np.nan}
        for i in range(6)
    ]
    path = visuals.plot_metric_boxplots(per_case, tmp_path / "box.png")
    picture = iio.imread(path)
    assert picture.ndim == 3 and picture[..., :3].std() > 0
    visuals.plot_metric_boxplots([], tmp_path / "empty.png")
    assert iio.imread(tmp_path / "empty.png").ndim == 3

    images = [rng.normal(size=(3, 4, 5)) for _ in range(2)]
    labels = [rng.integers(0, 3, size=(3, 4, 5)) for _ in range(2)]
    pairs = list(zip(images, labels, strict=True))
    edges, counts = visuals.intensity_histograms(pairs, 3, (-2.0, 2.0), bins=8)
    for c in range(3):
        want = sum(np.histogram(im[lab == c], bins=8, range=(-2, 2))[0] for im, lab in pairs)
        np.testing.assert_array_equal(counts[c], want)
    np.testing.assert_allclose(edges, np.linspace(-2, 2, 9))
    fingerprint = {"class_names": ["background", "kidney", "tumor"], "num_cases": 2,
                   "class_voxel_counts": [1000, 50, 5], "class_case_counts": [2, 2, 1]}
    path = visuals.plot_dataset_overview(fingerprint, tmp_path / "data.png", (edges, counts))
    wide = iio.imread(path)
    narrow = iio.imread(visuals.plot_dataset_overview(fingerprint, tmp_path / "freq.png"))
    assert wide.shape[1] > narrow.shape[1]  # the histogram panel is added
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "box.png", "data.png", "empty.png", "freq.png"
    ]


# -- crop, caps and memory: a whole CT case must never be drawn in float RGB ----------------

BIG = (40, 30, 50)


@pytest.fixture
def labelled_volume():
    image = np.random.default_rng(0).random(BIG, dtype=np.float32)
    truth = np.zeros(BIG, np.uint8)
    truth[10:14, 8:12, 20:26] = 1
    pred = np.zeros(BIG, np.uint8)
    pred[12:16, 9:13, 22:28] = 2
    return image, truth, pred


def panels(frames, width, count=3):
    """The panels of a strip of frames, cut at the separators."""
    return [frames[:, :, p * (width + GAP) : p * (width + GAP) + width] for p in range(count)]


def test_overlay_is_cropped_to_the_labels_capped_and_downscaled(labelled_volume):
    image, truth, pred = labelled_volume
    view = {"window": (0.0, 1.0), "gap": GAP}
    full = overlay_frames(image, truth, pred, margin=None, max_frames=None, max_size=None, **view)
    assert full.shape == (40, 30, 3 * 50 + 2 * GAP, 3)
    # truth ∪ prediction spans slices 10..15, rows 8..12, columns 20..27; 2 voxels more
    crop = overlay_frames(image, truth, pred, margin=2, max_frames=None, max_size=None, **view)
    assert crop.dtype == np.uint8
    assert crop.shape == (18 - 8, 15 - 6, 3 * (30 - 18) + 2 * GAP, 3)
    for want, got in zip(panels(full, 50), panels(crop, 12), strict=True):
        np.testing.assert_array_equal(got, want[8:18, 6:15, 18:30])

    # at most 4 frames, evenly spread over the cropped slices, first and last included
    capped = overlay_frames(image, truth, pred, margin=2, max_frames=4, max_size=None, **view)
    np.testing.assert_array_equal(capped, crop[[0, 3, 6, 9]])

    # panels of at most 6 pixels: 9 x 12 halves to 4 x 6 (round half to even), nearest
    small = overlay_frames(image, truth, pred, margin=2, max_frames=None, max_size=6, **view)
    assert small.shape == (10, 4, 3 * 6 + 2 * GAP, 3)
    rows = (np.arange(4) + 0.5) * 9 / 4
    cols = (np.arange(6) + 0.5) * 12 / 6
    for want, got in zip(panels(crop, 12), panels(small, 6), strict=True):
        np.testing.assert_array_equal(got, want[:, rows.astype(int)][:, :, cols.astype(int)])


def test_overlay_without_labels_keeps_the_whole_slices_but_caps_frames():
    image = np.random.default_rng(1).random((100, 20, 24), dtype=np.float32)
    frames = overlay_frames(image, None, np.zeros(image.shape, np.uint8), max_frames=64)
    assert frames.shape == (64, 20, 3 * 24 + 2 * 2, 3)
    # the first and last slice are among the frames: frame 0 is slice 0, frame 63 slice 99
    whole = overlay_frames(image, None, None, max_frames=None, window=(0.0, 1.0))
    capped = overlay_frames(image, None, None, max_frames=64, window=(0.0, 1.0))
    np.testing.assert_array_equal(capped[[0, -1]], whole[[0, 99]])


def test_overlay_memory_stays_far_below_the_volume():
    import tracemalloc

    image = np.random.default_rng(2).random((64, 256, 256), dtype=np.float32)  # 16 MB
    truth = np.zeros(image.shape, np.uint8)
    truth[20:40, 100:160, 90:150] = 1
    tracemalloc.start()
    try:
        frames = overlay_frames(image, truth, truth, spacing=(2.0, 0.8, 0.8))
        montage, _ = visuals.slice_montage(image, truth, truth, spacing=(2.0, 0.8, 0.8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # drawing the whole volume in float RGB took ~120 bytes per voxel (2 GB here)
    assert peak < image.nbytes / 2, peak
    assert frames.dtype == montage.dtype == np.uint8
    assert frames.shape[0] == 20 + 2 * 8  # the labelled slices and the margin


def test_montage_cells_are_the_cropped_frames(labelled_volume):
    image, truth, pred = labelled_volume
    view = {"window": (0.0, 1.0), "margin": 2, "max_size": None}
    montage, indices = visuals.slice_montage(image, truth, pred, num_slices=3, columns=3,
                                             gap=3, **view)
    assert list(indices) == [10, 12, 15]  # spread over the labelled slices 10..15
    crop = overlay_frames(image, truth, pred, max_frames=None, **view)  # slices 8..17
    height, width = crop.shape[1:3]
    assert montage.shape == (height, 3 * width + 2 * 3, 3)
    for cell, index in enumerate(indices):
        left = cell * (width + 3)
        np.testing.assert_array_equal(montage[:, left : left + width], crop[index - 8])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"axis": 3}, "axis must be 0, 1 or 2"),
        ({"margin": -1}, "margin must be >= 0"),
        ({"max_frames": 0}, "max_frames must be a positive"),
        ({"max_size": 0}, "max_size must be a positive"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing must be positive and finite"),
        ({"spacing": (1.0, 1.0)}, "spacing must have 3 entries"),
    ],
)
def test_bad_view_arguments_are_refused_before_drawing(case, kwargs, fragment):
    image, truth, pred = case
    with pytest.raises(ValueError, match=fragment):
        overlay_frames(image, truth, pred, **kwargs)


def test_empty_or_flat_volumes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="image is empty"):
        overlay_frames(np.zeros((0, 4, 4), np.float32), None, None)
    with pytest.raises(ValueError, match="must be a 3D volume"):
        visuals.slice_montage(np.zeros((4, 4), np.float32), None, None)
    with pytest.raises(ValueError, match="differs from image shape"):
        write_overlay_gif(tmp_path / "x.gif", np.zeros((3, 4, 4)), np.zeros((3, 4, 5)), None)
    assert list(tmp_path.iterdir()) == []
