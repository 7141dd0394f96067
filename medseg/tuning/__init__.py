"""Optuna searches over the medseg config: the only part of medseg that imports optuna.

``tune(config)`` runs (or resumes) the study declared in ``config.tune``; every trial trains
through :func:`medseg.tracking.run_training` as a nested MLflow run of the study's run, is
pruned from its per-epoch validation Dice, and the best trial's config is exported as a
train config.
"""

from medseg.tuning.pruning import DicePruningCallback, mean_validation_dice
from medseg.tuning.space import SearchParam, parse_param, parse_space, suggest_overrides
from medseg.tuning.study import (
    TuneResult,
    export_best_config,
    fail_dead_trials,
    finished_trials,
    load_study,
    objective_value,
    open_study,
    optimize,
    study_run,
    trial_table,
    tune,
)

__all__ = [
    "DicePruningCallback",
    "SearchParam",
    "TuneResult",
    "export_best_config",
    "fail_dead_trials",
    "finished_trials",
    "load_study",
    "mean_validation_dice",
    "objective_value",
    "open_study",
    "optimize",
    "parse_param",
    "parse_space",
    "study_run",
    "suggest_overrides",
    "trial_table",
    "tune",
]
