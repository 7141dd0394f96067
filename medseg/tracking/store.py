"""Where MLflow keeps runs: a sqlite store under ``mlruns/`` with artifacts beside it."""

from __future__ import annotations

import os
from pathlib import Path

# MLflow reads this at import time; medseg never phones home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from medseg.config import TrackingConfig, redact  # noqa: E402


def resolve_tracking_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///path`` absolute (against ``base`` or the working dir).

    MLflow resolves relative sqlite paths against the process's working directory, which
    differs between the CLI, a notebook kernel and the UI; an absolute URI means one store.
    """
    if redact(uri) != uri:
        # MLflow prints "View run ... at: <uri>" when a run ends: not with a password in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = (base or Path.cwd()) / uri[len(prefix) :]
        return prefix + str(path.resolve())
    return uri


def configure(config: TrackingConfig, base: Path | None = None) -> str:
    """Point MLflow at the configured store and return the experiment id.

    A sqlite store's folder is created; a new experiment gets its artifacts under
    ``<artifact_root>/artifacts`` (absolute), so the store and its files move together.
    """
    uri = resolve_tracking_uri(config.tracking_uri, base)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    root = Path(config.artifact_root)
    if not root.is_absolute():
        root = (base or Path.cwd()) / root
    location = (root / "artifacts").resolve()
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(config.experiment, artifact_location=location.as_uri())
