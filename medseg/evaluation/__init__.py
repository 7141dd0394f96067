"""Per-case metrics and visual reports of segmentations."""

from medseg.evaluation.metrics import dice_per_class, dice_region, summarize
from medseg.evaluation.visuals import overlay_frames, plot_learning_curves, write_overlay_gif

__all__ = [
    "dice_per_class",
    "dice_region",
    "overlay_frames",
    "plot_learning_curves",
    "summarize",
    "write_overlay_gif",
]
