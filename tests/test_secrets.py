"""No credential leaves the process: a password in ``tracking.tracking_uri`` (a real MLflow
server over HTTP) and in ``tune.storage`` appears nowhere in the server's store, its
artifacts, the client's artifact folder or an executed notebook."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from medseg.config import Config, redact

TRACK_SECRET = "track-s3cret-7f2a"
TUNE_SECRET = "tune-s3cret-91cd"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://optuna:pw@db:5432/o", "postgresql://optuna:***@db:5432/o"),
        ("postgresql+psycopg://u:p%40ss@h/d", "postgresql+psycopg://u:***@h/d"),
        ("http://user:pw@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
        ("https://h/api?token=abc&x=1", "https://h/api?token=***&x=1"),
        ("mysql://h/d?user=u&password=pw", "mysql://h/d?user=u&password=***"),
        ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
        ("http://user@host/no-password", "http://user@host/no-password"),
        ("see s3://bucket/key and file:///a:b/c", "see s3://bucket/key and file:///a:b/c"),
    ],
)
def test_redact_hides_url_passwords_only(text, expected):
    assert redact(text) == expected


def test_config_exports_redact_but_memory_keeps_the_secret(tmp_path):
    storage = f"postgresql://optuna:{TUNE_SECRET}@db.invalid/optuna"
    config = Config().with_overrides({"tune.storage": storage})
    assert config.tune.storage == storage  # what the process connects with
    assert Config.from_dict(config.to_dict()).tune.storage == storage  # copies keep it
    assert TUNE_SECRET not in config.to_json(redacted=True)
    assert config.to_flat_dict(redacted=True)["tune.storage"] == "postgresql://optuna:***@db.invalid/optuna"
    config.save(tmp_path / "config.json")  # a file is shared: saved redacted
    assert TUNE_SECRET not in (tmp_path / "config.json").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite store and proxied artifacts."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
    ]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(tmp_path / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not answer on {base}") from None
            time.sleep(1)
    try:
        yield port, root
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def files_containing(folder: Path, secret: str) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            found.append(path)
    return found


@pytest.mark.slow
def test_passwords_appear_nowhere_in_the_store_or_artifacts(
    tiny_config, tmp_path, mlflow_server, capfd
):
    from mlflow.tracking import MlflowClient

    from medseg.tracking import MlflowObserver
    from medseg.workflows import run_experiment

    port, server_root = mlflow_server
    uri = f"http://medseg:{TRACK_SECRET}@127.0.0.1:{port}"
    client_root = tmp_path / "client-artifacts"
    config = tiny_config(
        **{
            "tracking.tracking_uri": uri,
            "tracking.artifact_root": str(client_root),
            "tracking.experiment": "secrets",
            "tune.storage": f"postgresql://optuna:{TUNE_SECRET}@db.invalid/optuna",
            "train.epochs": 1,
        }
    )
    observer = MlflowObserver()
    run_experiment(config, observer=observer)

    run = MlflowClient(uri).get_run(observer.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["tune.storage"] == "postgresql://optuna:***@db.invalid/optuna"
    assert run.data.params["tracking.tracking_uri"] == f"http://medseg:***@127.0.0.1:{port}"
    client = MlflowClient(uri)
    assert "config.json" in {a.path for a in client.list_artifacts(observer.run_id)}
    assert client.search_logged_models([run.info.experiment_id])  # the model was logged
    printed = capfd.readouterr()
    for secret in (TRACK_SECRET, TUNE_SECRET):
        assert secret not in printed.out + printed.err
        assert files_containing(server_root, secret) == []
        assert files_containing(client_root, secret) == []


@pytest.mark.slow
def test_a_study_keeps_the_tracking_password_out_of_optuna_mlflow_and_best_config(
    tiny_config, tmp_path, mlflow_server, capfd
):
    from mlflow.tracking import MlflowClient

    from medseg.tuning import tune

    port, server_root = mlflow_server
    uri = f"http://medseg:{TRACK_SECRET}@127.0.0.1:{port}"
    optuna_db = tmp_path / "optuna.db"  # sqlite takes no password: the tracking URI has one
    config = tiny_config(
        **{
            "tracking.tracking_uri": uri,
            "tracking.artifact_root": str(tmp_path / "client-artifacts"),
            "tracking.experiment": "secrets-study",
            "tracking.log_model": False,
            "tune.storage": f"sqlite:///{optuna_db}",
            "tune.study_name": "secrets",
            "tune.space": ["train.learning_rate=cat:0.03"],
            "tune.n_trials": 1,
            "train.epochs": 1,
        }
    )
    best = tmp_path / "best_config.json"
    result = tune(config, workers=1, best_config=best)
    assert len(result.trials) == 1 and result.trials[0]["state"] == "COMPLETE"

    study_run = MlflowClient(uri).get_run(result.study_run_id)
    assert study_run.data.params["tracking.tracking_uri"] == f"http://medseg:***@127.0.0.1:{port}"
    assert "***" in best.read_text()  # the exported config keeps the key, not the secret
    printed = capfd.readouterr()
    assert TRACK_SECRET not in printed.out + printed.err
    for folder in (server_root, tmp_path / "client-artifacts"):
        assert files_containing(folder, TRACK_SECRET) == []
    assert TRACK_SECRET.encode() not in optuna_db.read_bytes()
    assert TRACK_SECRET.encode() not in best.read_bytes()
