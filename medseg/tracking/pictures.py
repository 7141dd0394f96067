"""The README's pictures, made from a logged run's artifacts.

``python -m medseg.tracking.pictures --run-id RUN_ID --output notebooks/images/`` writes

- ``overlay.png``: the middle frame of the run's ``plots/overlay_<case>.gif`` (image |
  ground truth | prediction), and
- ``dice_boxplot.png``: a box plot of the per-case validation Dice per structure, from
  ``evaluation/validation_cases.tsv``.

Both are written through a temporary file and renamed, so a failed run leaves no picture
half-written.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from medseg.io.atomic import write_atomically
from medseg.tracking import names

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

OVERLAY = "overlay.png"
DICE_BOXPLOT = "dice_boxplot.png"


def middle_frame(gif: str | os.PathLike) -> np.ndarray:
    """The middle frame of an animated GIF as an ``(H, W, 3)`` uint8 array.

    Raises
    ------
    ValueError
        ``gif`` cannot be read as an image, or has no frame.
    """
    import imageio.v3 as iio

    try:
        frames = iio.imread(gif, index=None)  # (frames, H, W, channels)
    except Exception as err:  # imageio raises OSError, ValueError, ... per plugin
        raise ValueError(f"overlay {gif} cannot be read as a GIF: {err}") from err
    if frames.ndim == 3:  # a single-frame GIF reads as (H, W, channels)
        frames = frames[None]
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"overlay {gif} has no frame (shape {frames.shape})")
    return np.ascontiguousarray(frames[len(frames) // 2, ..., :3])


def read_case_dice(table: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per-case Dice per structure from a ``validation_cases.tsv``: ``{structure: values}``.

    Columns ``dice_<structure>``; empty and ``nan`` cells (a structure absent from both
    label maps) are left out of that structure's values.

    Raises
    ------
    ValueError
        The table has no ``dice_*`` column, or a cell is not a number.
    """
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    columns = [c for c in (rows[0].keys() if rows else []) if c.startswith("dice_")]
    if not columns:
        raise ValueError(f"{table}: no dice_<structure> column (is it a validation_cases.tsv?)")
    dice = {}
    for column in columns:
        values = []
        for line, row in enumerate(rows, start=2):
            text = (row[column] or "nan").strip()
            try:
                values.append(float(text))
            except ValueError as err:
                raise ValueError(
                    f"{table} line {line}, column {column}: {text!r} is not a number"
                ) from err
        values = np.asarray(values, dtype=float)
        dice[column.removeprefix("dice_")] = values[np.isfinite(values)]
    return dice


def save_overlay(frame: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ``(H, W, 3)`` uint8 frame as a PNG (atomically)."""
    import imageio.v3 as iio

    return write_atomically(path, lambda tmp: iio.imwrite(tmp, frame))


def save_dice_boxplot(
    dice: dict[str, np.ndarray], path: str | os.PathLike, title: str = ""
) -> Path:
    """Box plot of per-case Dice, one box per structure, each case a dot (atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; only files
    import matplotlib.pyplot as plt

    shown = {k: v for k, v in dice.items() if len(v)}
    if not shown:
        raise ValueError(f"no finite Dice value to plot for {path}")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(shown), 3.6), dpi=120)
    try:
        ax.boxplot(list(shown.values()), showfliers=False)
        ax.set_xticks(range(1, len(shown) + 1), list(shown))
        rng = np.random.default_rng(0)  # fixed jitter: the same run gives the same picture
        for i, values in enumerate(shown.values(), start=1):
            ax.plot(i + rng.uniform(-0.12, 0.12, len(values)), values, "o", ms=3, alpha=0.6)
        ax.set_ylabel("Dice per validation case")
        low = min(v.min() for v in shown.values())
        ax.set_ylim(max(0.0, np.floor((low - 0.02) * 20) / 20), 1.005)  # the spread shows
        ax.grid(axis="y", alpha=0.3)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def write_pictures(
    run_id: str, output: str | os.PathLike, tracking_uri: str = "sqlite:///mlruns/mlflow.db"
) -> list[Path]:
    """Write ``overlay.png`` and ``dice_boxplot.png`` of a logged run into ``output``.

    Raises
    ------
    ValueError
        The run does not exist in the store, or lacks ``plots/overlay_*.gif`` or
        ``evaluation/validation_cases.tsv`` (a medseg train run has both).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from medseg.config import redact
    from medseg.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(
            f"run {run_id} is not in {redact(uri)}: give a run id of medseg train "
            "(and --tracking-uri for another store)"
        ) from err
    gifs = sorted(
        f.path for f in client.list_artifacts(run_id, "plots")
        if f.path.endswith(".gif") and Path(f.path).name.startswith("overlay_")
    )
    tables = [f.path for f in client.list_artifacts(run_id, "evaluation")]
    missing = [
        what for what, ok in (
            ("plots/overlay_<case>.gif", gifs), (names.VALIDATION_CASES, names.VALIDATION_CASES
                                                 in tables),
        ) if not ok
    ]
    if missing:
        raise ValueError(
            f"run {run_id} has no {' nor '.join(missing)}: pictures need a medseg train run "
            "that validated (not a study or cross-validation parent run)"
        )
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="medseg-pictures-") as tmp:
        gif = client.download_artifacts(run_id, gifs[0], tmp)
        table = client.download_artifacts(run_id, names.VALIDATION_CASES, tmp)
        frame = middle_frame(gif)  # read both before writing either
        dice = read_case_dice(table)
        name = run.data.tags.get("mlflow.runName", run_id)
        return [
            save_overlay(frame, output / OVERLAY),
            save_dice_boxplot(dice, output / DICE_BOXPLOT, title=f"run {name}"),
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medseg.tracking.pictures",
        description="Write a logged run's overlay middle frame and per-case Dice box plot "
        "as PNGs (the README's pictures).",
        epilog="example: python -m medseg.tracking.pictures --run-id "
        "0123456789abcdef0123456789abcdef --output notebooks/images/",
    )
    parser.add_argument("--run-id", required=True, help="a medseg train run's MLflow run id")
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    parser.add_argument(
        "--tracking-uri", default="sqlite:///mlruns/mlflow.db",
        help="MLflow tracking URI the run is in (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        written = write_pictures(args.run_id, args.output, args.tracking_uri)
    except (ValueError, OSError) as err:
        print(f"pictures: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
