"""Sessions: tests, lint, demo, notebooks. Each installs what it needs into its own venv."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).parent
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
DEMO_TIME_BUDGET = "5m"  # training time; the demo's other phases take ~1-4 minutes


# Tiny parameters every notebook accepts, for the `notebooks` session and CI.
TINY_NOTEBOOK_PARAMS = {
    "config_name": "tiny",
    "epochs": 1,
    "steps_per_epoch": 2,
    "patch_size": "[8, 16, 16]",
    "filters": 4,
    "depth": 2,
}
# and per notebook: 2 folds, a short study with its storage in the session's temp dir;
# predict.ipynb predicts with the newest model logged before it (cross_validate's folds)
NOTEBOOK_EXTRA_PARAMS = {
    "cross_validate.ipynb": {"folds": 2},
    "tune.ipynb": {"n_trials": 2, "storage": "sqlite:///{tmp}/optuna.db"},
}


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, slow end-to-end tests included."""
    session.install(".[dev]")
    args = session.posargs or ["-ra"]
    # the TFDS builder tests live beside their builders, in the installed medseg_datasets
    session.run("pytest", "tests", *args, env=ENV)
    session.run("pytest", "--pyargs", "medseg_datasets", *args, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """Build the phantom dataset, train through the notebook, log to mlruns/."""
    session.install(".")
    session.run("medseg", "build", "kits_phantom", "--config", "small", env=ENV)
    # the plan fits the training to DEMO_TIME_BUDGET on this machine (timed here), so
    # build + plan + training + validation stay within 10 minutes on a slow 2-core CPU too;
    # more time: nox -s demo -- 20m
    budget = session.posargs[0] if session.posargs else DEMO_TIME_BUDGET
    session.run("medseg", "plan", "kits_phantom", "--config", "small", "--time-budget", budget,
                env=ENV)
    session.run(
        "medseg", "run", "notebooks/train.ipynb", "-p", "config_name", "small",
        "-p", "time_budget", budget, env=ENV,
    )
    session.log("Open the runs in the MLflow UI:  medseg ui   (or: nox -s ui)")
    session.log("then browse http://127.0.0.1:5000, experiment 'medseg'")


@nox.session
def ui(session: nox.Session) -> None:
    """The MLflow UI on http://127.0.0.1:5000 against mlruns/."""
    session.install(".")
    session.run("medseg", "ui", *session.posargs, env=ENV)


@nox.session
def notebooks(session: nox.Session) -> None:
    """Execute every notebook in notebooks/ through papermill with tiny parameters."""
    session.install(".")
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**ENV, "TFDS_DATA_DIR": os.path.join(tmp, "tfds")}
        for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
            values = {**TINY_NOTEBOOK_PARAMS, **NOTEBOOK_EXTRA_PARAMS.get(nb.name, {})}
            params = [
                a for k, v in values.items() for a in ("-p", k, str(v).format(tmp=tmp))
            ]
            session.run(
                "medseg", "run", str(nb), *params, "--tracking-uri", uri,
                "--output", os.path.join(tmp, nb.name), env=env,
            )


@nox.session
def browser(session: nox.Session) -> None:
    """`medseg ui` on a tiny run, checked in headless Chromium (metrics and the GIF shown).

    Needs Debian's chromium (`apt-get install chromium`); with CI set, its absence fails.
    """
    session.install(".[dev]")
    session.run("pytest", "tests/test_ui_browser.py", "-ra", *session.posargs, env=ENV)
