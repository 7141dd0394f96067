"""Running an experiment inside an MLflow run (:class:`~medseg.tracking.MlflowObserver`)."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from medseg.config import Config
from medseg.tracking.observer import MlflowObserver
from medseg.workflows.experiment import ExperimentResult, run_experiment

__all__ = ["run_training"]


def run_training(
    config: Config,
    run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[ExperimentResult, str | None]:
    """Run one experiment inside an MLflow run (a new one, or ``run_id`` if given).

    ``callbacks`` are Keras callbacks called after the one logging epoch metrics to MLflow
    (e.g. Optuna's pruning). Returns the experiment's result and the run id.

    In a multi-worker run (``TF_CONFIG``) every worker trains, but only rank 0 opens an
    MLflow run and logs; the others return ``(result, None)``.
    """
    observer = MlflowObserver(run_id=run_id, extra_tags=extra_tags)
    result = run_experiment(config, observer, callbacks)
    return result, observer.run_id if observer.recorded else None
