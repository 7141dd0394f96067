"""Keras callbacks that log to the active MLflow run."""

from __future__ import annotations

import math
import time
from typing import Any

import keras
import mlflow

__all__ = ["MlflowMetrics", "finite"]


class MlflowMetrics(keras.callbacks.Callback):
    """Log Keras' epoch metrics to the active MLflow run, one step per epoch, with the
    optimizer's learning rate at the epoch's end (``lr``: a schedule's current value) and
    the epoch's wall time in seconds (``epoch_time_s``, validation included)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        values = {k: float(v) for k, v in (logs or {}).items() if finite(v)}
        if hasattr(self, "_started"):
            values["epoch_time_s"] = time.perf_counter() - self._started
        rate = learning_rate(self.model)
        if finite(rate):
            values["lr"] = float(rate)
        if values:
            mlflow.log_metrics(values, step=epoch)


def learning_rate(model) -> float | None:
    """The learning rate ``model``'s optimizer uses now, or None without one."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None
    # an optimizer with a schedule evaluates it at its own step count here
    rate = getattr(optimizer, "learning_rate", None)
    try:
        return float(keras.ops.convert_to_numpy(rate))
    except (TypeError, ValueError):
        return None


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (MLflow refuses NaN and infinities)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
