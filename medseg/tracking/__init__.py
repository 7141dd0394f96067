"""MLflow tracking: the only part of medseg that imports mlflow (with :mod:`medseg.tuning`)."""

from medseg.tracking.run import MlflowMetrics, git_state, log_result, model_signature, run_training
from medseg.tracking.store import configure, resolve_tracking_uri

__all__ = [
    "MlflowMetrics",
    "configure",
    "git_state",
    "log_result",
    "model_signature",
    "resolve_tracking_uri",
    "run_training",
]
