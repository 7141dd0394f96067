"""Shared test set-up.

TensorFlow's logical devices can only be configured before the runtime starts, so the
split of the CPU into two logical devices (for MirroredStrategy tests) happens here, at
collection time, for the whole session.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A TFDS data dir holding ``kits_phantom/tiny``, built once per test session."""
    from medseg import datasets

    data_dir = tmp_path_factory.mktemp("tfds")
    datasets.prepare("kits_phantom", "tiny", str(data_dir))
    return str(data_dir)


# A config small enough to train in seconds on the tiny phantom.
TINY_OVERRIDES = {
    "data.config": "tiny",
    "preprocess.target_spacing": [4.0, 2.0, 2.0],
    "patch.patch_size": [8, 16, 16],
    "patch.validation_patches": 1,
    "model.filters": 4,
    "model.depth": 2,
    "train.epochs": 2,
    "train.steps_per_epoch": 2,
    # augmentation stays on, without XLA: compiling it costs seconds per test process
    "augment.jit": False,
    # these tests exercise the phases with the config's own values; planning (and its
    # probe of this machine) is tested in test_planning.py
    "plan.mode": "none",
}


@pytest.fixture(scope="session")
def tiny_config(tiny_data_dir):
    """``tiny_config(**overrides)``: a Config on the tiny phantom with ``overrides`` applied."""
    from medseg.config import Config

    def make(**overrides):
        values = {**TINY_OVERRIDES, "data.data_dir": tiny_data_dir, **overrides}
        return Config().with_overrides(values)

    return make


# -- real servers: a throwaway PostgreSQL cluster and an MLflow server on top --------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_binaries() -> tuple[str, str]:
    """``initdb`` and ``pg_ctl``; skipped outside CI without them, a failure in CI."""
    import glob
    import shutil

    found = [shutil.which(name) for name in ("initdb", "pg_ctl")]
    if None in found:  # Debian keeps them out of PATH
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1:]
        found = [found[0], found[0].replace("initdb", "pg_ctl")] if found else [None, None]
    if None in found:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return found[0], found[1]


@pytest.fixture(scope="session")
def postgres_url():
    """``postgresql://postgres@127.0.0.1:<port>/postgres`` of a cluster made for this session.

    initdb/pg_ctl on a free port, in a temporary folder removed afterwards. PostgreSQL
    refuses to run as root, so as root the cluster belongs to the ``postgres`` user.
    """
    import shutil
    import subprocess
    import tempfile

    initdb, pg_ctl = _postgres_binaries()
    folder = tempfile.mkdtemp(prefix="medseg-pg-")
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = f"{folder}/data", free_port()
    subprocess.run(
        [*run_as, initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True, capture_output=True,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run_as, pg_ctl, "-D", data, "-o", options, "-l", f"{folder}/log", "-w", "start"],
        check=True, capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", data, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_database(postgres_url):
    """``postgres_database(name)``: the URL of a new, empty database of the cluster."""
    import sqlalchemy

    def make(name: str) -> str:
        engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        engine.dispose()
        return postgres_url.rsplit("/", 1)[0] + f"/{name}"

    return make


@pytest.fixture(scope="session")
def mlflow_server(postgres_database, tmp_path_factory):
    """``http://127.0.0.1:<port>`` of ``mlflow server`` on the PostgreSQL cluster, artifacts
    proxied (``--artifacts-destination``), as ``nox -s server`` starts it."""
    import subprocess
    import sys
    import time
    import urllib.request

    artifacts = tmp_path_factory.mktemp("server-artifacts")
    port = free_port()
    log = open(artifacts.parent / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", postgres_database("mlflow"),
            "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("mlflow server did not start:\n" + open(log.name).read()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_an_earlier_test(monkeypatch):
    """MLFLOW_TRACKING_URI is a user's choice that medseg follows, and mlflow.set_tracking_uri
    writes it into the environment: one test's store must not become the next one's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # mlflow.set_experiment keeps the id in the environment and in the fluent module: an
    # id of another test's store must not be the next run's experiment
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    from mlflow.tracking import fluent

    monkeypatch.setattr(fluent, "_active_experiment_id", None)
