"""Evaluation protocols in MLflow: a parent run, one nested child run per fold.

Each child run is a complete training run (params, epoch metrics, per-case metrics TSV,
plots, the fold's model); the parent holds the pooled evaluation over all folds' test cases
(``cv_<metric>_<class>_{mean,median,std}``, the cases TSV with a fold column, boxplots), the
splits file, the postprocessing decision, the dataset-exploration view and ``ensemble.json``
listing the fold models, which :func:`load_fold_models` turns back into an ensemble for
``predict_case(models, ...)``.

An interrupted evaluation resumes: ``run_evaluation(config, resume_run_id=parent)`` reuses
the folds whose child runs finished (their per-case scores and model are read back from
MLflow) and runs the others. The fold loop itself is
:func:`medseg.workflows.run_cross_validation`'s; this module only observes it.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from medseg.config import Config
from medseg.tracking.observer import MlflowObserver, finished_folds
from medseg.workflows.cross_validation import CrossValidationResult, run_cross_validation

__all__ = ["fold_model_uris", "load_fold_models", "run_evaluation"]


def run_evaluation(
    config: Config, resume_run_id: str | None = None, run_id: str | None = None
) -> tuple[CrossValidationResult, str | None]:
    """Run ``config.evaluation.protocol`` with a nested MLflow run per fold.

    Parameters
    ----------
    config : Config
    resume_run_id : str, optional
        An interrupted evaluation's parent run: folds with a finished child run are read
        back instead of trained again. Its params must equal those of ``config`` resolved
        against the plan.
    run_id : str, optional
        An existing run to be the parent (a notebook's run); default a new one.

    Returns
    -------
    result : CrossValidationResult
    run_id : str
        The parent run's id (None on workers other than the chief). Fold models are
        logged to their child runs when ``tracking.log_model`` is set (the default;
        resuming needs them).
    """
    if resume_run_id and run_id and resume_run_id != run_id:
        raise ValueError(f"resume_run_id {resume_run_id} and run_id {run_id} name two runs")
    observer = MlflowObserver(
        run_id=resume_run_id or run_id, cross_validation=True, resume=resume_run_id is not None
    )
    cv = run_cross_validation(config, observer)
    return cv, observer.run_id if observer.recorded else None


def fold_model_uris(parent_run_id: str, tracking_uri: str | None = None) -> list[str]:
    """``runs:/<child>/model`` of each finished fold of an evaluation run, in fold order."""
    children = list(finished_folds(MlflowClient(tracking_uri), parent_run_id).values())
    if not children:
        raise ValueError(
            f"MLflow run {parent_run_id} has no finished fold runs (is it an evaluation run?)"
        )
    children.sort(key=lambda r: int(r.data.tags.get("medseg.fold_index", 0)))
    return [f"runs:/{r.info.run_id}/model" for r in children]


def load_fold_models(parent_run_id: str, tracking_uri: str | None = None) -> list:
    """The fold models of an evaluation run, for ``predict_case(models, ...)``."""
    from medseg.tracking.model import load_model

    return [load_model(uri, tracking_uri) for uri in fold_model_uris(parent_run_id, tracking_uri)]
