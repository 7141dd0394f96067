"""The seam between a workflow and whoever records it.

A workflow (:func:`~medseg.workflows.run_experiment`,
:func:`~medseg.workflows.run_cross_validation`) tells its observer what happens, in order:

1. ``run_started(config)`` before planning (a tracker opens its run here, so a failing
   plan is recorded too);
2. ``planned(config, setup)`` with the config resolved against the plan (the values the
   run uses, and the ones to log);
3. ``callbacks()`` for training: Keras callbacks (per-epoch metrics, pruning);
4. per fold of a cross-validation, ``fold_started(fold, index)`` returns the fold's own
   observer, which goes through these steps for the fold, unless its
   ``finished_result(...)`` gives back a fold finished earlier (resume);
5. ``run_finished(result)`` with the workflow's result, or ``run_failed(error)``.

:class:`Observer` itself records nothing; :class:`medseg.tracking.MlflowObserver` records
to MLflow. Keras callbacks remain the seam inside training, as in Keras.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

    from medseg.config import Config
    from medseg.evaluation.protocols import Fold
    from medseg.workflows.experiment import DataSetup, ExperimentResult

__all__ = ["Observer"]


class Observer:
    """An observer that records nothing; subclass it and override what you need."""

    def run_started(self, config: Config) -> None:
        """The workflow starts (``config`` as given, before planning)."""

    def planned(self, config: Config, setup: DataSetup) -> None:
        """The dataset is read and planned: ``config`` is the one the run uses."""

    def callbacks(self) -> Sequence[keras.callbacks.Callback]:
        """Keras callbacks to add to training."""
        return ()

    def fold_started(self, fold: Fold, index: int) -> Observer:
        """A cross-validation fold starts; returns the observer of that fold."""
        return Observer()

    def finished_result(
        self, config: Config, setup: DataSetup, fold: Fold
    ) -> ExperimentResult | None:
        """A fold's result recorded by an earlier, interrupted run (None: run the fold)."""
        return None

    def run_finished(self, result: Any) -> None:
        """The workflow's result: an ExperimentResult or a CrossValidationResult."""

    def run_failed(self, error: BaseException) -> None:
        """The workflow raised ``error`` (it is re-raised after this)."""
