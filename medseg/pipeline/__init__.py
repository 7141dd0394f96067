"""``tf.data`` input pipelines: reading (``reading``), preprocessing (``preprocess``),
the cache of preprocessed cases (``cache``), the stateless patch stream (``dataset``)."""

from medseg.pipeline.cache import CaseTable, cache_key, preprocessed_cases
from medseg.pipeline.dataset import (
    case_order,
    check_patch_config,
    training_dataset,
    validation_dataset,
)
from medseg.pipeline.preprocess import (
    PreprocessPlan,
    anisotropic_axis,
    crop_to_box,
    nonzero_box,
    normalize,
    one_hot,
    pad_to_shape,
    plan_preprocessing,
    preprocess_case,
    resample,
    resample_labels,
    resampled_shape,
)
from medseg.pipeline.reading import check_patch_fits, read_case_ids, read_cases, split_cases

__all__ = [
    "CaseTable",
    "PreprocessPlan",
    "anisotropic_axis",
    "cache_key",
    "case_order",
    "check_patch_config",
    "check_patch_fits",
    "crop_to_box",
    "nonzero_box",
    "normalize",
    "one_hot",
    "pad_to_shape",
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
