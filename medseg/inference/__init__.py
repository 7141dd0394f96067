"""Whole-case inference with patch-based models."""

from medseg.inference.predictor import predict_case
from medseg.inference.sliding_window import (
    gaussian_importance,
    predict_sliding_window,
    window_starts,
)

__all__ = ["gaussian_importance", "predict_case", "predict_sliding_window", "window_starts"]
