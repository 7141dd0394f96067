"""Optuna searches over the medseg config: the only part of medseg that imports optuna.

``tune(config)`` runs (or resumes) the study declared in ``config.tune``; every trial trains
through :func:`medseg.tracking.run_training` as a nested MLflow run of the study's run, is
pruned from its per-epoch validation Dice, and the best trial's config is exported as a
train config. The study's run also gets Optuna's plots of the study (``plots/*.png``).
"""

from medseg.tuning.plots import PLOTS, draw_plot, log_study_plots, save_plot, skip_reason
from medseg.tuning.pruning import DicePruningCallback, mean_validation_dice
from medseg.tuning.space import SearchParam, parse_param, parse_space, suggest_overrides
from medseg.tuning.study import (
    TuneResult,
    export_best_config,
    fail_dead_trials,
    finished_trials,
    load_study,
    make_pruner,
    make_sampler,
    objective_value,
    open_study,
    optimize,
    study_run,
    trial_table,
    tune,
)

__all__ = [
    "PLOTS",
    "DicePruningCallback",
    "SearchParam",
    "TuneResult",
    "draw_plot",
    "export_best_config",
    "fail_dead_trials",
    "finished_trials",
    "load_study",
    "log_study_plots",
    "make_pruner",
    "make_sampler",
    "mean_validation_dice",
    "objective_value",
    "open_study",
    "optimize",
    "parse_param",
    "parse_space",
    "save_plot",
    "skip_reason",
    "study_run",
    "suggest_overrides",
    "trial_table",
    "tune",
]
