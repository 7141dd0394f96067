"""Visual reports: overlay GIFs and slice montages of a case, learning curves, metric
boxplots and the dataset-exploration view (class frequencies, intensity histograms per class).

Figures are drawn on matplotlib's Agg canvas without pyplot, so reports never touch the
global pyplot state or the interactive backend of a notebook. Files are written to a
temporary name in the target directory and renamed, so a crash never leaves a half-written
report behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from medseg.io.atomic import write_atomically

__all__ = [
    "DEFAULT_CLASS_COLORS",
    "intensity_histograms",
    "label_colors",
    "overlay_frames",
    "plot_dataset_overview",
    "plot_learning_curves",
    "plot_metric_boxplots",
    "slice_montage",
    "uncertainty_frames",
    "write_overlay_gif",
    "write_slice_montage",
    "write_uncertainty_gif",
]

#: KiTS colours: kidney red, tumour blue.
DEFAULT_CLASS_COLORS: Mapping[int, tuple[int, int, int]] = {1: (255, 0, 0), 2: (0, 0, 255)}

# after red and blue: distinct, saturated colours (Kelly's / Tableau-like), then hues
_PALETTE = [
    (255, 0, 0),
    (0, 0, 255),
    (0, 200, 0),
    (255, 220, 0),
    (255, 0, 255),
    (0, 220, 220),
    (255, 128, 0),
    (128, 0, 255),
    (128, 64, 0),
    (0, 128, 128),
]


def label_colors(num_labels: int) -> dict[int, tuple[int, int, int]]:
    """One distinct RGB colour per foreground label ``1 .. num_labels - 1``.

    Parameters
    ----------
    num_labels : int
        Number of labels including background (label 0 gets no colour).

    Returns
    -------
    colors : dict of int to (r, g, b)
        Kidney (1) red and tumour (2) blue as in `DEFAULT_CLASS_COLORS`, then eight more
        fixed colours; beyond those, fully saturated hues spaced by the golden angle, so
        any number of labels gets colours that differ from their neighbours.
    """
    import colorsys

    colors = {}
    for label in range(1, num_labels):
        if label <= len(_PALETTE):
            colors[label] = _PALETTE[label - 1]
        else:
            hue = (label * 0.618033988749895) % 1.0
            r, g, b = colorsys.hsv_to_rgb(hue, 1.0, 1.0)
            colors[label] = (round(r * 255), round(g * 255), round(b * 255))
    return colors


def _as_volume(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[-1] == 1:  # drop a trailing channel axis
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(
            f"{name} must be a 3D volume (optionally with one channel), got shape {array.shape}"
        )
    return array


def _nearest_indices(length: int, new_length: int) -> np.ndarray:
    return np.minimum((np.arange(new_length) + 0.5) * length / new_length, length - 1).astype(int)


# voxels per chunk when scanning labels: a boolean copy of the whole volume would cost one
# byte per voxel (a KiTS case: 250 MB), a chunk of ~4 M voxels costs 4 MB
_SCAN_VOXELS = 1 << 22


def _label_presence(labels: Sequence[np.ndarray | None], shape) -> list[np.ndarray]:
    """Per axis, which indices hold a label voxel (nonzero) of any of ``labels``."""
    present = [np.zeros(n, dtype=bool) for n in shape]
    step = max(1, _SCAN_VOXELS // max(1, shape[1] * shape[2]))
    for label in labels:
        if label is None:
            continue
        for start in range(0, shape[0], step):
            nonzero = label[start : start + step] != 0
            # reductions over contiguous views: any(axis=(1, 2)) would copy the chunk
            present[0][start : start + len(nonzero)] |= nonzero.reshape(len(nonzero), -1).any(1)
            present[1] |= nonzero.any(axis=2).any(axis=0)
            present[2] |= nonzero.reshape(-1, shape[2]).any(axis=0)
            del nonzero  # else it lives on while the next chunk is compared
    return present


def _crop_box(present: Sequence[np.ndarray], margin: int | None) -> tuple[slice, ...]:
    """The labels' bounding box widened by ``margin`` voxels (the whole volume without
    labels or without a margin)."""
    if margin is None or not present[0].any():
        return tuple(slice(0, len(p)) for p in present)
    box = []
    for p in present:
        index = np.flatnonzero(p)
        box.append(slice(max(0, index[0] - margin), min(len(p), index[-1] + 1 + margin)))
    return tuple(box)


def _spread(candidates: np.ndarray, count: int | None) -> np.ndarray:
    """At most ``count`` of ``candidates``, evenly spread (first and last included)."""
    if count is None or len(candidates) <= count:
        return candidates
    return candidates[np.round(np.linspace(0, len(candidates) - 1, count)).astype(int)]


def _check_view(axis, margin, max_size, spacing) -> int:
    """Validate the view arguments before anything is allocated; the axis in 0..2."""
    if not isinstance(axis, int | np.integer) or not -3 <= axis < 3:
        raise ValueError(f"axis must be 0, 1 or 2 (the volume's axes), got {axis!r}")
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be >= 0 voxels (or None: no crop), got {margin}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be a positive number of pixels (or None), got {max_size}")
    if spacing is not None:
        if len(spacing) != 3:
            raise ValueError(f"spacing must have 3 entries, got {spacing}")
        if not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return int(axis) % 3


def _prepare(image, truth, pred, prediction_panel, class_colors):
    """The volumes (views, no copies), the label panels shown and their colours."""
    image = _as_volume(image, "image")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape}): nothing to draw")
    shown = ((truth, "truth"), (pred, "pred")) if prediction_panel else ((truth, "truth"),)
    labels = [None if x is None else _as_volume(x, name) for x, name in shown]
    for label in labels:
        if label is not None and label.shape != image.shape:
            raise ValueError(f"label shape {label.shape} differs from image shape {image.shape}")
    if class_colors is None:
        top = max((int(x.max()) for x in labels if x is not None and x.size), default=0)
        class_colors = label_colors(top + 1)
    return image, labels, class_colors


def _render(
    image: np.ndarray,
    labels: Sequence[np.ndarray | None],
    axis: int,
    indices: np.ndarray,
    box: tuple[slice, ...],
    colors: Mapping[int, Sequence[int]],
    alpha: float,
    window: tuple[float, float] | None,
    spacing: Sequence[float] | None,
    gap: int,
    max_size: int | None,
) -> np.ndarray:
    """The frames of slices ``indices`` along ``axis``, cropped to ``box``, built one by one
    in uint8: only the shown slices, resampled to their output size, are ever floats."""
    row_axis, col_axis = (a for a in range(3) if a != axis)
    rows_box, cols_box = box[row_axis], box[col_axis]
    rows, cols = rows_box.stop - rows_box.start, cols_box.stop - cols_box.start
    new_rows, new_cols = rows, cols
    if spacing is not None:  # square pixels: the finer axis' spacing for both
        row_spacing, col_spacing = float(spacing[row_axis]), float(spacing[col_axis])
        finest = min(row_spacing, col_spacing)
        new_rows = max(1, round(rows * row_spacing / finest))
        new_cols = max(1, round(cols * col_spacing / finest))
    if max_size is not None and max(new_rows, new_cols) > max_size:
        factor = max_size / max(new_rows, new_cols)
        new_rows, new_cols = max(1, round(new_rows * factor)), max(1, round(new_cols * factor))
    grid = np.ix_(
        rows_box.start + _nearest_indices(rows, new_rows),
        cols_box.start + _nearest_indices(cols, new_cols),
    )

    def plane(volume: np.ndarray, index: int) -> np.ndarray:
        key = [slice(None)] * 3
        key[axis] = int(index)
        return volume[tuple(key)][grid]  # a view of the slice, then the small resampled copy

    gray = np.stack([plane(image, i).astype(np.float32) for i in indices])
    lo, hi = np.nanpercentile(gray, [1, 99]) if window is None else window
    scale = 255.0 / (hi - lo) if hi > lo else 0.0  # a constant image renders black
    gray = np.nan_to_num(np.clip((gray - lo) * scale, 0.0, 255.0), copy=False)  # NaN: black

    panels = 1 + len(labels)
    width = panels * new_cols + (panels - 1) * gap
    frames = np.full((len(indices), new_rows, width, 3), 255, dtype=np.uint8)  # white gaps
    for frame, index in enumerate(indices):
        base = np.repeat(gray[frame][..., None], 3, axis=-1)
        for p, label in enumerate([None, *labels]):
            panel = base
            if label is not None:
                panel = base.copy()
                label = plane(label, index)
                for value, color in colors.items():
                    mask = label == value
                    panel[mask] = (1.0 - alpha) * panel[mask] + alpha * np.asarray(
                        color, np.float32
                    )
            left = p * (new_cols + gap)
            frames[frame, :, left : left + new_cols] = np.round(panel)
    return frames


def overlay_frames(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray | None,
    axis: int = 0,
    class_colors: Mapping[int, Sequence[int]] | None = None,
    alpha: float = 0.45,
    window: tuple[float, float] | None = None,
    spacing: Sequence[float] | None = None,
    gap: int = 2,
    prediction_panel: bool = True,
    margin: int | None = 8,
    max_frames: int | None = 64,
    max_size: int | None = 256,
) -> np.ndarray:
    """Render a case slice by slice as image | ground truth | prediction panels.

    Only the labels' neighbourhood is drawn, at most ``max_frames`` slices of at most
    ``max_size`` pixels, built frame by frame in uint8, so a whole CT case costs megabytes,
    not a float RGB copy of the volume (~120 bytes per voxel).

    Parameters
    ----------
    image : ndarray, shape ``(D, H, W)`` or ``(D, H, W, 1)``
        Intensity volume.
    truth, pred : ndarray of int or None
        Label maps of the image's shape; ``None`` (e.g. an unlabelled case) leaves that
        panel as the plain image.
    axis : int, optional
        Axis to slice along; one frame per index.
    class_colors : mapping of int to (r, g, b), optional
        Colour of each label; defaults to `label_colors` for every label present (kidney
        red, tumour blue, then one distinct colour per further class). Labels without a
        colour (background) are not drawn.
    alpha : float, optional
        Opacity of the label colours.
    window : (float, float), optional
        Intensity range mapped to black..white; defaults to the 1st and 99th percentiles of
        the slices shown.
    spacing : sequence of 3 floats, optional
        Voxel spacing of the volume's axes. When given, slice rows or columns are repeated
        (nearest neighbour) so that pixels are square and anisotropic slices keep their
        physical aspect ratio.
    gap : int, optional
        Width in pixels of the white separator between panels.
    prediction_panel : bool, optional
        False leaves the prediction panel out (image | ground truth: a dataset's cases,
        ``pred`` then ignored).
    margin : int or None, optional
        The volume is cropped to the bounding box of the labels shown (truth ∪ prediction)
        widened by this many voxels on every side; ``None`` (or no label at all) keeps the
        whole volume.
    max_frames : int or None, optional
        At most this many frames, evenly spread over the cropped slices; ``None``: all.
    max_size : int or None, optional
        Panels larger than this many pixels (rows or columns, after the spacing
        correction) are downscaled, nearest neighbour, to fit; ``None``: never.

    Returns
    -------
    frames : ndarray of uint8, shape ``(frames, H', 3 W' + 2 gap, 3)``
        RGB frames; without ``spacing``, cropping and downscaling, ``H'`` and ``W'`` are the
        slice's shape, in the order of the remaining axes.

    Raises
    ------
    ValueError
        A volume that is not 3D, labels of another shape, or an invalid ``axis``,
        ``spacing``, ``margin``, ``max_frames`` or ``max_size``, before anything is drawn.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be a positive number (or None), got {max_frames}")
    frames, _ = _overlay(
        image, truth, pred, axis, lambda present, span: _spread(span, max_frames),
        class_colors=class_colors, alpha=alpha, window=window, spacing=spacing, gap=gap,
        prediction_panel=prediction_panel, margin=margin, max_size=max_size,
    )
    return frames


def _overlay(
    image, truth, pred, axis, pick, *, class_colors=None, alpha=0.45, window=None,
    spacing=None, gap=2, prediction_panel=True, margin=8, max_size=256,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames of the slices ``pick(present, span)`` chooses (``present`` flags the slices
    along ``axis`` holding a label, ``span`` holds the crop's slice indices), and those
    indices; keyword arguments as `overlay_frames`."""
    axis = _check_view(axis, margin, max_size, spacing)
    image, labels, colors = _prepare(image, truth, pred, prediction_panel, class_colors)
    present = _label_presence(labels, image.shape)
    box = _crop_box(present, margin)
    indices = pick(present[axis], np.arange(box[axis].start, box[axis].stop))
    frames = _render(image, labels, axis, indices, box, colors, alpha, window, spacing, gap,
                     max_size)
    return frames, indices


def write_overlay_gif(
    path: str | os.PathLike,
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray | None,
    axis: int = 0,
    fps: float = 8,
    **kw,
) -> Path:
    """Write the frames of `overlay_frames` as a looping GIF.

    Parameters
    ----------
    path : path-like
        Target file (``.gif``); parent directories are created.
    image, truth, pred, axis
        As in `overlay_frames`.
    fps : float, optional
        Frames per second.
    **kw
        Further keyword arguments of `overlay_frames` (``class_colors``, ``alpha``,
        ``window``, ``spacing``, ``gap``, ``prediction_panel``, and the crop and caps
        ``margin``, ``max_frames``, ``max_size``).

    Returns
    -------
    path : Path
        The written file.

    Notes
    -----
    The GIF writer (Pillow) merges consecutive identical frames into one longer frame, so a
    volume with runs of identical slices reads back with fewer frames.
    """
    frames = overlay_frames(image, truth, pred, axis=axis, **kw)

    def write(tmp: Path) -> None:
        iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)

    return write_atomically(path, write)


def uncertainty_frames(
    image: np.ndarray,
    seg: np.ndarray,
    entropy: np.ndarray,
    axis: int = 0,
    vmax: float | None = None,
    *,
    spacing: Sequence[float] | None = None,
    gap: int = 2,
    margin: int | None = 8,
    max_frames: int | None = 64,
    max_size: int | None = 256,
) -> np.ndarray:
    """Render a case as image | segmentation | entropy heat map panels.

    Cropped to the segmentation's neighbourhood and capped like `overlay_frames`, built in
    uint8 frame by frame.

    Parameters
    ----------
    image, seg : ndarray, shape ``(D, H, W)``
        Intensities and the predicted label map.
    entropy : ndarray, shape ``(D, H, W)``
        Per-voxel uncertainty (e.g. predictive entropy in nats).
    axis : int, optional
        Axis to slice along.
    vmax : float, optional
        Uncertainty drawn at full heat (``ln K`` for the entropy of ``K`` classes);
        default the largest value shown. 0 and below is black (inferno colour map).
    spacing, gap, margin, max_frames, max_size
        As in `overlay_frames`.

    Returns
    -------
    frames : ndarray of uint8, shape ``(frames, H', 3 W' + 2 gap, 3)``
    """
    from matplotlib import colormaps  # imported here: metrics users do not pay for it

    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be a positive number (or None), got {max_frames}")
    if vmax is not None and not (np.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be a positive finite number (or None), got {vmax}")
    entropy = _as_volume(entropy, "entropy")
    if entropy.shape != _as_volume(image, "image").shape:
        raise ValueError(f"entropy shape {entropy.shape} differs from image shape {image.shape}")
    frames, indices = _overlay(
        image, seg, None, axis, lambda present, span: _spread(span, max_frames),
        spacing=spacing, gap=gap, prediction_panel=False, margin=margin, max_size=max_size,
    )
    axis = int(axis) % 3
    box = _crop_box(_label_presence([_as_volume(seg, "seg")], entropy.shape), margin)
    if vmax is None:  # the largest value in the slices shown (a small crop, not the volume)
        shown = entropy[tuple(box[a] if a != axis else indices for a in range(3))]
        top = float(np.nanmax(shown)) if shown.size else 0.0
        vmax = top if top > 0 else 1.0
    heat = _render(entropy, [], axis, indices, box, {}, 0.0, (0.0, vmax), spacing, 0, max_size)
    rgb = colormaps["inferno"](heat[..., 0].astype(np.float32) / 255.0)[..., :3]
    heat = np.round(rgb * 255).astype(np.uint8)
    spacer = np.full((*heat.shape[:2], gap, 3), 255, np.uint8)
    return np.concatenate([frames, spacer, heat], axis=2)


def write_uncertainty_gif(
    path: str | os.PathLike,
    image: np.ndarray,
    seg: np.ndarray,
    entropy: np.ndarray,
    axis: int = 0,
    fps: float = 8,
    **kw,
) -> Path:
    """Write the frames of `uncertainty_frames` (image | segmentation | entropy) as a
    looping GIF, atomically; ``**kw`` as `uncertainty_frames`. Returns the path."""
    frames = uncertainty_frames(image, seg, entropy, axis=axis, **kw)

    def write(tmp: Path) -> None:
        iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)

    return write_atomically(path, write)


def plot_learning_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike) -> Path:
    """Plot training curves to a PNG: losses on the left, Dice metrics on the right.

    Parameters
    ----------
    history : mapping of str to sequence of float
        Per-epoch values, e.g. ``keras.callbacks.History.history`` (a ``History`` object is
        accepted too). ``loss`` and ``val_loss`` go on the first axis, keys starting with
        ``dice`` or ``val_dice`` on the second; other keys are ignored.
    path : path-like
        Target file (``.png``); parent directories are created.

    Returns
    -------
    path : Path
        The written file.
    """
    # imported here so that metrics users do not pay for matplotlib
    from matplotlib.figure import Figure

    history = getattr(history, "history", history)
    loss_keys = [k for k in ("loss", "val_loss") if k in history]
    dice_keys = sorted(k for k in history if k.startswith(("dice", "val_dice")))

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, dice_ax = fig.subplots(1, 2)
    for ax, keys, title in ((loss_ax, loss_keys, "loss"), (dice_ax, dice_keys, "Dice")):
        for key in keys:
            values = np.asarray(history[key], dtype=float)
            epochs = np.arange(1, len(values) + 1)
            style = "--" if key.startswith("val_") else "-"
            ax.plot(epochs, values, style, marker="o", markersize=3, label=key)
        if keys:
            ax.legend()
        else:
            ax.text(
                0.5, 0.5, f"no {title} in history", ha="center", va="center", transform=ax.transAxes
            )
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    dice_ax.set_ylim(0.0, 1.02)  # Dice is a fraction; a fixed scale makes runs comparable

    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _pick_slices(present: np.ndarray, count: int) -> np.ndarray:
    """``count`` slice indices evenly spread over the slices holding any label (else all)."""
    candidates = np.flatnonzero(present) if present.any() else np.arange(len(present))
    return _spread(candidates, count)


def slice_montage(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray | None,
    axis: int = 0,
    num_slices: int = 9,
    columns: int = 3,
    gap: int = 4,
    **kw,
) -> tuple[np.ndarray, np.ndarray]:
    """A grid of image | ground truth | prediction strips of evenly spread slices.

    Parameters
    ----------
    image, truth, pred, axis
        As in `overlay_frames`.
    num_slices : int, optional
        Number of slices shown, spread evenly over the slices containing a label (over all
        slices when there is none).
    columns : int, optional
        Strips per row of the grid.
    gap : int, optional
        White margin in pixels between strips.
    **kw
        Further keyword arguments of `overlay_frames` (``class_colors``, ``spacing``,
        ``margin``, ``max_size``, ...; each strip is cropped and downscaled as a frame
        there, and only the slices shown are drawn).

    Returns
    -------
    montage : ndarray of uint8, shape ``(rows * (H' + gap) - gap, columns * (W' + gap) - gap, 3)``
        The grid, row by row; cells past the last slice are white.
    indices : ndarray of int
        The slice index shown in each cell, in row-major order.
    """
    if num_slices < 1 or columns < 1:
        raise ValueError(f"num_slices and columns must be positive, got {num_slices}, {columns}")
    kw.pop("max_frames", None)  # num_slices counts the cells
    frames, indices = _overlay(
        image, truth, pred, axis, lambda present, span: _pick_slices(present, num_slices), **kw
    )
    columns = min(columns, len(indices))
    rows = -(-len(indices) // columns)
    height, width = frames.shape[1:3]
    montage = np.full(
        (rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8
    )
    for cell, frame in enumerate(frames):
        r, c = divmod(cell, columns)
        top, left = r * (height + gap), c * (width + gap)
        montage[top : top + height, left : left + width] = frame
    return montage, indices


def write_slice_montage(path: str | os.PathLike, image, truth, pred, **kw) -> Path:
    """Write `slice_montage` as a PNG (atomically); keyword arguments as there."""
    montage, _ = slice_montage(image, truth, pred, **kw)
    return write_atomically(path, lambda tmp: iio.imwrite(tmp, montage, extension=".png"))


def plot_metric_boxplots(
    per_case: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("dice", "iou", "surface_dice", "hd95", "asd", "volume_diff_rel"),
    class_names: Sequence[str] | None = None,
) -> Path:
    """Boxplots of per-case metrics: one panel per metric, one box per class.

    Parameters
    ----------
    per_case : sequence of dict
        Scores of each case keyed ``<metric>_<class>`` (`medseg.evaluation.score_case`).
    path : path-like
        Target ``.png``.
    metrics : sequence of str, optional
        Metric prefixes to plot; metrics without any finite value are left out.
    class_names : sequence of str, optional
        Classes (the suffixes) in display order; default: every suffix found, sorted.

    Returns
    -------
    path : Path
    """
    from matplotlib.figure import Figure

    def values(metric: str, name: str) -> np.ndarray:
        v = np.array([float(c.get(f"{metric}_{name}", np.nan)) for c in per_case], dtype=float)
        return v[np.isfinite(v)]

    panels = []
    for metric in metrics:
        names = class_names or sorted(
            {k[len(metric) + 1 :] for c in per_case for k in c if k.startswith(metric + "_")}
        )
        data = [(n, values(metric, n)) for n in names]
        data = [(n, v) for n, v in data if v.size]
        if data:
            panels.append((metric, data))

    columns = max(1, min(3, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig = Figure(figsize=(4 * columns, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, (metric, data) in zip(axes, panels, strict=False):
        ax.boxplot([v for _, v in data], tick_labels=[n for n, _ in data], showmeans=True)
        ax.set_title(f"{metric} ({sum(v.size for _, v in data)} values)")
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[len(panels) :]:
        ax.axis("off")
    if not panels:
        axes[0].text(0.5, 0.5, "no finite metric values", ha="center", va="center")
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def intensity_histograms(
    cases, num_classes: int, value_range: tuple[float, float], bins: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel intensity histograms per class, accumulated over cases.

    Parameters
    ----------
    cases : iterable of (image, label)
        Images ``(D, H, W)`` or ``(D, H, W, C)`` (channel 0 is used) and their label maps.
    num_classes : int
        Number of labels, background included.
    value_range : (float, float)
        Histogram range; intensities outside it are not counted (as `numpy.histogram`).
    bins : int, optional
        Number of equal-width bins.

    Returns
    -------
    edges : ndarray, shape ``(bins + 1,)``
    counts : ndarray of int64, shape ``(num_classes, bins)``
        ``counts[c]`` is the histogram of the voxels labelled ``c``.
    """
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    counts = np.zeros((num_classes, bins), dtype=np.int64)
    for image, label in cases:
        image = np.asarray(image)
        if image.ndim == 4:
            image = image[..., 0]
        label = np.asarray(label).reshape(image.shape)
        for c in range(num_classes):
            counts[c] += np.histogram(image[label == c], bins=edges)[0]
    return edges, counts


def plot_dataset_overview(
    fingerprint: Mapping,
    path: str | os.PathLike,
    histograms: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """The dataset-exploration view: class frequencies and intensity histograms per class.

    Parameters
    ----------
    fingerprint : dict
        A dataset fingerprint (``class_names``, ``class_voxel_counts``,
        ``class_case_counts``).
    path : path-like
        Target ``.png``.
    histograms : (edges, counts), optional
        From `intensity_histograms`; without it only the class frequencies are drawn.

    Returns
    -------
    path : Path
    """
    from matplotlib.figure import Figure

    names = list(fingerprint["class_names"])
    voxels = np.asarray(fingerprint["class_voxel_counts"], dtype=float)
    cases = np.asarray(fingerprint["class_case_counts"], dtype=float)
    colors = {0: (128, 128, 128), **label_colors(len(names))}
    rgb = [np.asarray(colors[i]) / 255 for i in range(len(names))]

    panels = 3 if histograms is not None else 2
    fig = Figure(figsize=(5 * panels, 4), layout="constrained")
    axes = fig.subplots(1, panels)
    share = 100 * voxels / max(voxels.sum(), 1)
    axes[0].bar(names, share, color=rgb)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("% of voxels (log)")
    axes[0].set_title("class voxel share")
    for x, v in enumerate(share):
        axes[0].annotate(f"{v:.3g} %", (x, v), ha="center", va="bottom", fontsize=8)
    axes[1].bar(names, cases, color=rgb)
    axes[1].set_title(f"cases containing the class (of {fingerprint.get('num_cases', '?')})")
    if histograms is not None:
        edges, counts = histograms
        centres = (edges[:-1] + edges[1:]) / 2
        for c, row in enumerate(np.asarray(counts)):
            if row.sum():
                axes[2].plot(centres, row / row.sum(), color=rgb[c], label=names[c])
        axes[2].set_xlabel("intensity")
        axes[2].set_ylabel("share of the class's voxels")
        axes[2].set_title("intensity per class")
        axes[2].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
