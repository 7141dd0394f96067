"""Whole-case inference with patch-based models."""

from medseg.inference.ensemble import Ensemble
from medseg.inference.files import (
    PredictionFailed,
    find_inputs,
    is_model_uri,
    load_model_file,
    model_source,
    output_paths,
    predict_files,
    provenance_key,
    sidecar_path,
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
    window_count,
    window_positions,
    window_starts,
)
from medseg.pipeline.geometry import resample_chunks, to_source_grid

__all__ = [
    "Ensemble",
    "PredictionFailed",
    "PredictionPlan",
    "SlidingWindow",
    "WeightedMerger",
    "as_predictor",
    "find_inputs",
    "gaussian_importance",
    "is_model_uri",
    "load_model_file",
    "mirror_flips",
    "model_source",
    "output_paths",
    "predict_batch",
    "predict_case",
    "predict_files",
    "predict_sliding_window",
    "provenance_key",
    "resample_chunks",
    "sidecar_path",
    "sliding_window_tensor",
    "to_source_grid",
    "window_count",
    "window_positions",
    "window_starts",
]
