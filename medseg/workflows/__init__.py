"""Workflows: the orchestrators that chain the phases (data → plan → train → predict →
evaluate), above the pure packages and below tracking and tuning, which observe them.

- :func:`run_experiment` trains one model and scores it on its validation cases;
- :func:`run_cross_validation` does so once per fold of an evaluation protocol and pools;
- :class:`Observer` is what they report to (:class:`medseg.tracking.MlflowObserver`).
"""

from medseg.workflows.cross_validation import (
    CrossValidationResult,
    combine_folds,
    make_folds,
    run_cross_validation,
    run_fold,
)
from medseg.workflows.experiment import (
    CaseResult,
    DataSetup,
    ExperimentResult,
    evaluate_cases,
    prepare_data,
    run_experiment,
    score_model,
    train_model,
)
from medseg.workflows.observer import Observer

__all__ = [
    "CaseResult",
    "CrossValidationResult",
    "DataSetup",
    "ExperimentResult",
    "Observer",
    "combine_folds",
    "evaluate_cases",
    "make_folds",
    "prepare_data",
    "run_cross_validation",
    "run_experiment",
    "run_fold",
    "score_model",
    "train_model",
]
