"""Keras callbacks that log to the active MLflow run."""

from __future__ import annotations

import math
from typing import Any

import keras
import mlflow

__all__ = ["MlflowMetrics", "finite"]


class MlflowMetrics(keras.callbacks.Callback):
    """Log Keras' epoch metrics to the active MLflow run, one step per epoch."""

    def on_epoch_end(self, epoch, logs=None):
        values = {k: float(v) for k, v in (logs or {}).items() if finite(v)}
        if values:
            mlflow.log_metrics(values, step=epoch)


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (MLflow refuses NaN and infinities)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
