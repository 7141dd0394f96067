"""Sessions: tests, lint, demo, notebooks, ui, beam, browser, server. Each installs what it needs into its own venv."""

from __future__ import annotations

import os
import shutil
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
def lab(session: nox.Session) -> None:
    """JupyterLab on http://127.0.0.1:8888 in notebooks/, no browser; open the URL with the
    token it prints. The notebooks run there on the project's kernel, unchanged.

    The notebooks' kernelspec is ``python3`` (papermill, `medseg run` and `nox -s notebooks`
    start it by that name): it is registered in this venv, pointing at its Python, and wins
    over a ``python3`` of the user's. Runs go to mlruns/mlflow.db like `medseg run`'s (the
    kernels start in notebooks/, where the default relative store would be another one),
    or to MLFLOW_TRACKING_URI when that is set.

    nox -s lab -- --port 8889   (the arguments go to jupyter lab)
    """
    session.install(".[notebook]")
    session.run(
        "python", "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3",
        "--display-name", "Python 3 (medseg)",
    )
    store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"
    (ROOT / "mlruns").mkdir(exist_ok=True)
    env = {**ENV, "MLFLOW_TRACKING_URI": store, "JUPYTER_PREFER_ENV_PATH": "1"}
    # Jupyter refuses root without --allow-root (containers, CI machines)
    root = ["--allow-root"] if os.geteuid() == 0 else []
    session.run(
        "jupyter", "lab", "--ip", "127.0.0.1", "--no-browser",
        f"--ServerApp.root_dir={ROOT / 'notebooks'}", *root, *session.posargs, env=env,
    )


@nox.session
def beam(session: nox.Session) -> None:
    """The Beam build tests (tests/test_beam_build.py) in a venv with apache-beam: Beam
    pins protobuf and pillow versions of its own, so it stays out of the other sessions."""
    session.install(".[beam,dev]")
    session.run("pytest", "tests/test_beam_build.py", "-ra", *session.posargs, env=ENV)


@nox.session
def browser(session: nox.Session) -> None:
    """`medseg ui` on a tiny run, checked in headless Chromium (metrics and the GIF shown).

    Needs Debian's chromium (`apt-get install chromium`); with CI set, its absence fails.
    """
    session.install(".[dev]")
    session.run("pytest", "tests/test_ui_browser.py", "-ra", *session.posargs, env=ENV)


SERVER_DIR = ROOT / "mlruns" / "server"  # the server session's cluster and artifacts (ignored by git)


def _postgres_cluster(session: nox.Session, port: int) -> str | None:
    """Start (creating on first use) a PostgreSQL cluster in SERVER_DIR/postgres on
    127.0.0.1:``port``; its URL, or None without PostgreSQL's initdb/pg_ctl."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        return None
    data = SERVER_DIR / "postgres"
    run_as = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        SERVER_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(SERVER_DIR, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    if not data.exists():
        session.run(*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                    external=True)
    options = f"-p {port} -k {SERVER_DIR} -c listen_addresses=127.0.0.1"
    session.run(*run_as, pg_ctl, "-D", str(data), "-o", options, "-l",
                str(SERVER_DIR / "postgres.log"), "-w", "start", external=True)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


@nox.session
def server(session: nox.Session) -> None:
    """A team's MLflow server on http://127.0.0.1:5000: runs in PostgreSQL (a local cluster
    in mlruns/server/, when initdb and pg_ctl exist; else sqlite), artifacts proxied into
    mlruns/server/artifacts. Point clients at it: MLFLOW_TRACKING_URI=http://127.0.0.1:5000.

    nox -s server -- --port 5001   (the other arguments go to mlflow server)
    """
    # the server alone: MLflow (the version medseg's clients use) and the PostgreSQL driver
    session.install("mlflow>=3.17,<4", "psycopg[binary]>=3.1")
    args = list(session.posargs)
    port = int(args[args.index("--port") + 1]) if "--port" in args else 5000
    if "--port" not in args:
        args += ["--port", str(port)]
    SERVER_DIR.mkdir(parents=True, exist_ok=True)
    backend = _postgres_cluster(session, port + 432)  # 5432 beside the default 5000
    if backend is None:
        session.warn("PostgreSQL's initdb/pg_ctl not found: the runs go to an sqlite file")
        backend = f"sqlite:///{SERVER_DIR / 'mlflow.db'}"
    try:
        session.run(
            "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", str(SERVER_DIR / "artifacts"),
            "--host", "127.0.0.1", *args, env=ENV,
        )
    finally:
        if backend.startswith("postgresql"):
            run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
            session.run(*run_as, shutil.which("pg_ctl"), "-D", str(SERVER_DIR / "postgres"), "-m", "fast",
                        "stop", external=True, success_codes=[0, 1])
