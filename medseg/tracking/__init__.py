"""MLflow tracking: the only part of medseg that imports mlflow (with :mod:`medseg.tuning`).

:class:`MlflowObserver` records medseg's workflows; :func:`run_training` and
:func:`~medseg.tracking.evaluation.run_evaluation` run them under it.
"""

from medseg.tracking.artifacts import log_result
from medseg.tracking.callbacks import MlflowMetrics
from medseg.tracking.lineage import git_state, package_versions
from medseg.tracking.model import model_signature
from medseg.tracking.observer import MlflowObserver
from medseg.tracking.run import run_training
from medseg.tracking.store import configure, resolve_tracking_uri

__all__ = [
    "MlflowMetrics",
    "MlflowObserver",
    "configure",
    "git_state",
    "log_result",
    "model_signature",
    "package_versions",
    "resolve_tracking_uri",
    "run_training",
]
