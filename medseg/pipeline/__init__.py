"""``tf.data`` input pipelines: preprocessing, patch sampling, assembly."""

from medseg.pipeline.dataset import (
    check_patch_fits,
    preprocessed_cases,
    read_case_ids,
    read_cases,
    split_cases,
    training_dataset,
    validation_dataset,
)
from medseg.pipeline.preprocess import (
    PreprocessPlan,
    normalize,
    plan_preprocessing,
    preprocess_case,
    resample,
    resample_labels,
    resampled_shape,
)

__all__ = [
    "PreprocessPlan",
    "check_patch_fits",
    "normalize",
    "plan_preprocessing",
    "preprocess_case",
    "preprocessed_cases",
    "read_case_ids",
    "read_cases",
    "resample",
    "resample_labels",
    "resampled_shape",
    "split_cases",
    "training_dataset",
    "validation_dataset",
]
