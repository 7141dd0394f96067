"""Visual reports: slice-by-slice overlay GIFs of a case, and learning-curve plots.

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
    "overlay_frames",
    "plot_learning_curves",
    "write_overlay_gif",
]

#: KiTS colours: kidney red, tumour blue.
DEFAULT_CLASS_COLORS: Mapping[int, tuple[int, int, int]] = {1: (255, 0, 0), 2: (0, 0, 255)}


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
) -> np.ndarray:
    """Render a case slice by slice as image | ground truth | prediction panels.

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
        Colour of each label; defaults to `DEFAULT_CLASS_COLORS` (kidney red, tumour blue).
        Labels without a colour (background) are not drawn.
    alpha : float, optional
        Opacity of the label colours.
    window : (float, float), optional
        Intensity range mapped to black..white; defaults to the image's 1st and 99th
        percentiles.
    spacing : sequence of 3 floats, optional
        Voxel spacing of the volume's axes. When given, slice rows or columns are repeated
        (nearest neighbour) so that pixels are square and anisotropic slices keep their
        physical aspect ratio.
    gap : int, optional
        Width in pixels of the white separator between panels.

    Returns
    -------
    frames : ndarray of uint8, shape ``(frames, H', 3 W' + 2 gap, 3)``
        RGB frames; without ``spacing``, ``H'`` and ``W'`` are the slice's shape, in the
        order of the remaining axes.
    """
    image = _as_volume(image, "image").astype(np.float32)
    labels = [
        None if x is None else _as_volume(x, name) for x, name in ((truth, "truth"), (pred, "pred"))
    ]
    for label in labels:
        if label is not None and label.shape != image.shape:
            raise ValueError(f"label shape {label.shape} differs from image shape {image.shape}")
    colors = DEFAULT_CLASS_COLORS if class_colors is None else class_colors

    lo, hi = np.percentile(image, [1, 99]) if window is None else window
    scale = 255.0 / (hi - lo) if hi > lo else 0.0  # a constant image renders black
    gray = np.clip((image - lo) * scale, 0.0, 255.0)
    gray = np.moveaxis(gray, axis, 0)
    base = np.repeat(gray[..., None], 3, axis=-1)

    panels = [base]
    for label in labels:
        panel = base.copy()
        if label is not None:
            label = np.moveaxis(label, axis, 0)
            for value, color in colors.items():
                mask = label == value
                panel[mask] = (1.0 - alpha) * panel[mask] + alpha * np.asarray(color, np.float32)
        panels.append(panel)

    if spacing is not None:
        if len(spacing) != 3:
            raise ValueError(f"spacing must have 3 entries, got {spacing}")
        row_spacing, col_spacing = np.delete(np.asarray(spacing, float), axis % 3)
        finest = min(row_spacing, col_spacing)
        rows, cols = base.shape[1:3]
        new_rows = max(1, round(rows * row_spacing / finest))
        new_cols = max(1, round(cols * col_spacing / finest))
        row_index = _nearest_indices(rows, new_rows)
        col_index = _nearest_indices(cols, new_cols)
        panels = [p[:, row_index][:, :, col_index] for p in panels]

    frames, rows = panels[0].shape[:2]
    separator = np.full((frames, rows, gap, 3), 255.0, dtype=np.float32)
    strip = [panels[0], separator, panels[1], separator, panels[2]]
    return np.round(np.concatenate(strip, axis=2)).astype(np.uint8)


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
        ``window``, ``spacing``, ``gap``).

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
