"""Where MLflow keeps runs: a sqlite store under ``mlruns/`` with artifacts beside it, or a
team's ``mlflow server`` (``http(s)://``) that keeps the artifacts itself.

``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` stand in for ``tracking.tracking_uri``
and ``tracking.experiment`` when a config does not give them.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

# MLflow reads this at import time; medseg never phones home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow retries a failing HTTP request 7 times with a doubling backoff (minutes); the
# server is checked once before a run (check_reachable), so a few quick retries suffice
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from medseg.config import Config, ConfigError, TrackingConfig, redact  # noqa: E402

ENVIRONMENT = {"tracking_uri": "MLFLOW_TRACKING_URI", "experiment": "MLFLOW_EXPERIMENT_NAME"}
_DEFAULTS = {f.name: f.default for f in fields(TrackingConfig)}
REACH_TIMEOUT = 5.0  # seconds; a live server answers /health at once
# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; medseg's
# experiments train models, so they get the classic view of runs, metrics and models
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class ServerUnreachable(ConfigError):
    """The tracking server or database of a URI does not answer."""


def is_remote(uri: str) -> bool:
    """Whether ``uri`` is an ``mlflow server`` (which stores artifacts itself)."""
    return uri.startswith(("http://", "https://"))


# mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into this process's environment
# (for its subprocesses): a value we made it write is not the user's choice, or one config
# would pick the store of the config before it. What it wrote, and the user's value then:
_WRITTEN: dict[str, str | None] = {"wrote": None, "user": None}


def environment_value(variable: str) -> str | None:
    """The user's value of ``variable`` (``MLFLOW_TRACKING_URI`` set by medseg's own
    :func:`set_tracking_uri` does not count; one set since does)."""
    value = os.environ.get(variable)
    if variable == ENVIRONMENT["tracking_uri"] and value is not None and value == _WRITTEN["wrote"]:
        return _WRITTEN["user"]
    return value


def set_tracking_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri``, remembering what it writes into the environment."""
    variable = ENVIRONMENT["tracking_uri"]
    _WRITTEN["user"] = environment_value(variable)
    mlflow.set_tracking_uri(uri)
    _WRITTEN["wrote"] = os.environ.get(variable)


def tracking_from_environment(
    tracking: TrackingConfig | Config, explicit: frozenset[str] | None = None
) -> TrackingConfig:
    """``tracking`` with ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME`` for the keys
    the config did not give.

    Parameters
    ----------
    tracking : TrackingConfig or Config
        A whole config says which keys were given (:attr:`Config.explicit_keys`); a
        section alone cannot, and a value equal to its default counts as not given.
    explicit : frozenset of str, optional
        ``section.key`` names given explicitly, overriding the above.
    """
    if isinstance(tracking, Config):
        explicit = tracking.explicit_keys if explicit is None else explicit
        tracking = tracking.tracking
    changes = {}
    for key, variable in ENVIRONMENT.items():
        value = environment_value(variable)
        given = (
            f"tracking.{key}" in explicit
            if explicit is not None
            else getattr(tracking, key) != _DEFAULTS[key]
        )
        if value and not given:
            changes[key] = value
    return replace(tracking, **changes) if changes else tracking


def resolve_tracking_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///path`` absolute (against ``base`` or the working dir).

    MLflow resolves relative sqlite paths against the process's working directory, which
    differs between the CLI, a notebook kernel and the UI; an absolute URI means one store.
    The default URI stands for ``MLFLOW_TRACKING_URI`` when that is set.
    """
    if uri == _DEFAULTS["tracking_uri"] and environment_value(ENVIRONMENT["tracking_uri"]):
        uri = environment_value(ENVIRONMENT["tracking_uri"])
    if redact(uri) != uri:
        # MLflow prints "View run ... at: <uri>" when a run ends: not with a password in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = (base or Path.cwd()) / uri[len(prefix) :]
        return prefix + str(path.resolve())
    return uri


def check_reachable(uri: str, key: str = "tracking.tracking_uri") -> None:
    """Fail at once, naming ``uri`` (password hidden), when its server or database does not
    answer within ``REACH_TIMEOUT`` seconds, instead of MLflow's minutes of retries.

    Raises
    ------
    ServerUnreachable
        If an ``http(s)://`` server does not answer ``/health`` or a database URL (other
        than sqlite) refuses a connection.
    """
    if is_remote(uri):
        import urllib.error
        import urllib.request
        from urllib.parse import urlsplit

        # /health needs no login; urllib cannot parse one in the URL anyway
        parts = urlsplit(uri)
        health = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        try:
            with urllib.request.urlopen(health.rstrip("/") + "/health", timeout=REACH_TIMEOUT):
                return
        except (OSError, urllib.error.URLError) as err:
            reason = getattr(err, "reason", err)
            what = "the MLflow server does not answer"
    elif "://" in uri and not uri.startswith(("sqlite:", "file:")):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(uri, connect_args=_connect_timeout(uri))
        except (ImportError, sqlalchemy.exc.NoSuchModuleError) as err:
            raise ConfigError(
                f"{key}={redact(uri)}: no database driver for it ({err}); for PostgreSQL: "
                "pip install 'medseg[postgres]'"
            ) from None
        try:
            with engine.connect():
                return
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as err:
            reason = str(err.orig).strip().splitlines()[0] if err.orig else err
            what = "the database does not answer"
        finally:
            engine.dispose()
    else:
        return
    raise ServerUnreachable(
        f"{key}={redact(uri)}: {what} ({redact(str(reason))}); start it, or fix the URL "
        f"(or {ENVIRONMENT['tracking_uri'] if key.startswith('tracking') else 'the config'})"
    )


def _connect_timeout(url: str) -> dict:
    """A driver's connect timeout, so an unreachable database fails in seconds."""
    if url.startswith(("postgresql", "mysql")):
        return {"connect_timeout": int(REACH_TIMEOUT)}
    return {}


def configure(config: TrackingConfig | Config, base: Path | None = None) -> str:
    """Point MLflow at the configured store and return the experiment id.

    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME`` fill the keys the config does not
    give (:func:`tracking_from_environment`). A sqlite store's folder is created; a new
    experiment gets its artifacts under ``<artifact_root>/artifacts`` (absolute), so the
    store and its files move together. On an ``mlflow server`` the server chooses (its
    proxied ``mlflow-artifacts:`` root): a client path would be one only this machine sees.
    """
    config = tracking_from_environment(config)
    uri = resolve_tracking_uri(config.tracking_uri, base)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    set_tracking_uri(uri)
    client = MlflowClient(uri)
    kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        # experiments medseg created before it set the kind; one a user chose stays
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    if is_remote(uri):
        return client.create_experiment(config.experiment, tags=kind)
    root = Path(config.artifact_root)
    if not root.is_absolute():
        root = (base or Path.cwd()) / root
    location = (root / "artifacts").resolve()
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(
        config.experiment, artifact_location=location.as_uri(), tags=kind
    )
