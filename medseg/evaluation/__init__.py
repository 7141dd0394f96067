"""Per-case metrics, evaluation protocols and visual reports of segmentations.

:mod:`medseg.workflows.cross_validation` (training a model per fold) is imported on its own:
it builds on :mod:`medseg.workflows.experiment`, which itself uses the metrics here.
"""

from medseg.evaluation.metrics import (
    METRICS,
    dice_per_class,
    dice_region,
    iou_per_class,
    score_case,
    summarize,
    volume_difference,
)
from medseg.evaluation.protocols import (
    Fold,
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
    "Fold",
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
