"""Per-case metrics, calibration, evaluation protocols and visual reports of segmentations.

Pure: arrays in, numbers and pictures out. The workflows that train and score models
(:mod:`medseg.workflows`) build on it, never the reverse.
"""

from medseg.evaluation.calibration import (
    CalibrationAccumulator,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    plot_reliability_diagram,
    read_temperature,
    reliability_curve,
    write_temperature,
)
from medseg.evaluation.metrics import (
    METRICS,
    Score,
    dice_per_class,
    dice_region,
    iou_per_class,
    long_scores,
    score_case,
    score_key,
    summarize,
    volume_difference,
    wide_scores,
)
from medseg.evaluation.protocols import (
    Fold,
    Splits,
    explicit_split,
    holdout_split,
    kfold_splits,
    leave_one_out_splits,
    load_or_create_splits,
    percentage_split,
)
from medseg.evaluation.surface import (
    directed_surface_distances,
    surface_distance_metrics,
    surface_voxels,
)
from medseg.evaluation.visuals import overlay_frames, plot_learning_curves, write_overlay_gif

__all__ = [
    "METRICS",
    "CalibrationAccumulator",
    "apply_temperature",
    "expected_calibration_error",
    "fit_temperature",
    "plot_reliability_diagram",
    "read_temperature",
    "reliability_curve",
    "write_temperature",
    "Score",
    "long_scores",
    "score_key",
    "wide_scores",
    "Fold",
    "Splits",
    "dice_per_class",
    "dice_region",
    "directed_surface_distances",
    "explicit_split",
    "holdout_split",
    "iou_per_class",
    "kfold_splits",
    "leave_one_out_splits",
    "load_or_create_splits",
    "overlay_frames",
    "percentage_split",
    "plot_learning_curves",
    "score_case",
    "summarize",
    "surface_distance_metrics",
    "surface_voxels",
    "volume_difference",
    "write_overlay_gif",
]
