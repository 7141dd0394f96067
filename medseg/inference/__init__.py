"""Whole-case inference with patch-based models."""

from medseg.inference.ensemble import Ensemble
from medseg.inference.files import (
    find_inputs,
    is_model_uri,
    load_model_file,
    output_paths,
    predict_files,
)
from medseg.inference.plan import PredictionPlan
from medseg.inference.predictor import predict_case
from medseg.inference.sliding_window import (
    SlidingWindow,
    WeightedMerger,
    as_predictor,
    gaussian_importance,
    mirror_flips,
    predict_batch,
    predict_sliding_window,
    sliding_window_tensor,
    window_starts,
)
from medseg.pipeline.geometry import resample_chunks, to_source_grid

__all__ = [
    "Ensemble",
    "PredictionPlan",
    "SlidingWindow",
    "WeightedMerger",
    "as_predictor",
    "find_inputs",
    "gaussian_importance",
    "is_model_uri",
    "load_model_file",
    "mirror_flips",
    "output_paths",
    "predict_batch",
    "predict_case",
    "predict_files",
    "predict_sliding_window",
    "resample_chunks",
    "sliding_window_tensor",
    "to_source_grid",
    "window_starts",
]
