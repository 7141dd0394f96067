"""Training: strategies, compiled models and fitting."""

from medseg.training.strategy import describe_devices, make_strategy
from medseg.training.trainer import build_compiled_model, fit, make_learning_rate, make_optimizer

__all__ = [
    "build_compiled_model",
    "describe_devices",
    "fit",
    "make_learning_rate",
    "make_optimizer",
    "make_strategy",
]
