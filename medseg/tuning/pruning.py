"""Pruning a trial from its per-epoch validation Dice, as a Keras callback."""

from __future__ import annotations

import math

import mlflow
import numpy as np
from optuna_integration.keras import KerasPruningCallback

MEAN_DICE = "val_dice_mean"


def mean_validation_dice(logs: dict) -> float:
    """Mean of the ``val_dice_*`` values (classes and regions) of one epoch's Keras logs,
    NaN values left out.

    Raises
    ------
    KeyError
        If the logs hold no ``val_dice_*`` value (no validation data).
    """
    values = [float(v) for k, v in logs.items() if k.startswith("val_dice_") and k != MEAN_DICE]
    if not values:
        raise KeyError(f"no val_dice_* metric in the epoch logs ({', '.join(sorted(logs))})")
    finite = [v for v in values if math.isfinite(v)]  # NaN: a class absent from the patches
    return float(np.mean(finite)) if finite else math.nan


class DicePruningCallback(KerasPruningCallback):
    """Report the monitored value to the trial after each epoch; prune when Optuna says so.

    ``monitor="val_dice_mean"`` is the mean of the ``val_dice_*`` metrics, added to the logs
    and logged to the active MLflow run; any other key is read as is.
    A monitored value missing from the logs is an error rather than a silent no-op, since a
    study would then never prune.
    """

    def __init__(self, trial, monitor: str = MEAN_DICE, interval: int = 1) -> None:
        super().__init__(trial, monitor, interval)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = {} if logs is None else logs
        if self._monitor == MEAN_DICE:
            logs[MEAN_DICE] = mean_validation_dice(logs)
            if mlflow.active_run() is not None:  # the trial's run: its curve in the UI
                mlflow.log_metric(MEAN_DICE, logs[MEAN_DICE], step=epoch)
        if self._monitor not in logs:
            raise KeyError(
                f"tune.prune_metric={self._monitor!r} is not in the epoch logs "
                f"({', '.join(sorted(logs))})"
            )
        if not math.isfinite(float(logs[self._monitor])):
            return  # Optuna cannot compare NaN; the trial's final value decides
        super().on_epoch_end(epoch, logs)
