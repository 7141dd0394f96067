"""A team's deployment: MLflow and Optuna on real servers (a throwaway PostgreSQL cluster and
``mlflow server``, see conftest.py), the MLFLOW_* environment, and unreachable servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import imageio.v3 as iio
import mlflow
import optuna
import pytest
from conftest import TINY_OVERRIDES
from mlflow.tracking import MlflowClient

from medseg.config import Config, ConfigError, TrackingConfig
from medseg.tracking.store import (
    ServerUnreachable,
    check_reachable,
    configure,
    tracking_from_environment,
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_environment_fills_the_tracking_keys_a_config_does_not_give(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    tracking = tracking_from_environment(Config())
    assert (tracking.tracking_uri, tracking.experiment) == (f"sqlite:///{tmp_path}/env.db", "from-env")
    # explicit config wins, even when it spells out the default
    given = Config().with_overrides(["tracking.tracking_uri=sqlite:///mlruns/mlflow.db"])
    tracking = tracking_from_environment(given)
    assert tracking.tracking_uri == "sqlite:///mlruns/mlflow.db"
    assert tracking.experiment == "from-env"
    # the store is made where the environment says
    experiment_id = configure(TrackingConfig(artifact_root=str(tmp_path)))
    assert (tmp_path / "env.db").is_file()
    assert MlflowClient(f"sqlite:///{tmp_path}/env.db").get_experiment(experiment_id).name == "from-env"


def test_unreachable_server_or_database_is_one_line_with_the_password_hidden():
    port = free_port()  # nothing listens there
    for uri in (f"http://ann:s3cret@127.0.0.1:{port}", f"postgresql://ann:s3cret@127.0.0.1:{port}/db"):
        with pytest.raises(ServerUnreachable, match="does not answer") as err:
            check_reachable(uri)
        message = str(err.value)
        assert f"tracking.tracking_uri={uri.replace('s3cret', '***')}" in message
        assert "s3cret" not in message and "\n" not in message
        assert isinstance(err.value, ConfigError)


def test_cli_exits_2_on_an_unreachable_tracking_server_or_study_database(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://ann:s3cret@127.0.0.1:{port}"}
    train = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "train", "train.epochs=1"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert train.returncode == 2, train.stderr[-2000:]
    assert f"http://ann:***@127.0.0.1:{port}: the MLflow server does not answer" in train.stderr
    assert "s3cret" not in train.stderr + train.stdout and "Traceback" not in train.stderr

    from medseg.cli import main
    from medseg.tuning import open_study

    config = Config().with_overrides([f"tune.storage=postgresql://ann:s3cret@127.0.0.1:{port}/db"])
    with pytest.raises(ServerUnreachable, match=r"tune.storage=postgresql://ann:\*\*\*@"):
        open_study(config)
    assert main(["tune", f"tune.storage=postgresql://ann:s3cret@127.0.0.1:{port}/db"]) == 2


@pytest.mark.slow
def test_training_logs_over_http_to_a_server_on_postgresql(mlflow_server, tiny_config, tmp_path, monkeypatch):
    from medseg.tracking import run_training

    config = tiny_config(**{"tracking.tracking_uri": mlflow_server, "tracking.experiment": "team",
                            "tracking.artifact_root": str(tmp_path / "client"),
                            "tracking.log_model": False})
    result, run_id = run_training(config)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("team")
    # the server's proxied root, never a path of this client
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    assert not (tmp_path / "client").exists()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    mlflow.set_tracking_uri(mlflow_server)
    gif = [a.path for a in client.list_artifacts(run_id, "plots") if a.path.endswith(".gif")]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=gif[0],
                                                dst_path=str(tmp_path / "download"))
    assert iio.imread(local, index=None).shape[0] == result.example["image"].shape[0]


@pytest.mark.slow
def test_medseg_train_uses_mlflow_tracking_uri_from_the_environment(mlflow_server, tiny_data_dir, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "env-team"}
    overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in TINY_OVERRIDES.items()]
    done = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "train", *overrides, f"data.data_dir={tiny_data_dir}",
         "tracking.log_model=false"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = MlflowClient(mlflow_server).search_runs(
        [MlflowClient(mlflow_server).get_experiment_by_name("env-team").experiment_id]
    )
    assert len(runs) == 1 and runs[0].info.run_id in done.stdout
    assert not (tmp_path / "mlruns").exists()  # nothing in the default local store


def _tune_overrides(tiny_data_dir: str, **extra) -> list[str]:
    values = {
        **TINY_OVERRIDES,
        "data.data_dir": tiny_data_dir,
        "train.epochs": 1,
        "tracking.log_model": False,
        "tune.space": ["train.learning_rate=cat:0.01|0.03"],
        "tune.n_trials": 4,
        **extra,
    }
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


def _nested_trials(client: MlflowClient, study: optuna.Study, experiment: str) -> None:
    """Every trial of ``study`` is exactly one nested run of its study run."""
    parent = study.user_attrs["mlflow_run_id"]
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    trials = {t.number: t for t in study.trials}
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == sorted(trials)
    for run in runs:
        assert trials[int(run.data.tags["optuna.trial_number"])].user_attrs["mlflow_run_id"] == (
            run.info.run_id
        )
    assert {t.state.name for t in trials.values()} == {"COMPLETE"}, [
        (t.number, t.state.name, t.user_attrs.get("error")) for t in trials.values()
    ]
    assert len(trials) >= 4


@pytest.mark.slow
def test_two_medseg_tune_processes_share_a_postgresql_study(
    postgres_database, mlflow_server, tiny_data_dir, tmp_path
):
    storage = postgres_database("optuna")
    args = _tune_overrides(
        tiny_data_dir, **{"tune.storage": storage, "tune.study_name": "shared",
                          "tracking.tracking_uri": mlflow_server, "tracking.experiment": "tuned"}
    )
    def start():
        return subprocess.Popen(
            [sys.executable, "-m", "medseg.cli", "tune", *args, "--workers", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )

    # the second machine joins a study the first has opened (with its MLflow run): two
    # processes opening a new study in the same instant can still each make a study run
    # (a known gap on database servers; sqlite serialises it)
    workers = [start()]
    deadline = time.monotonic() + 300
    while True:
        try:
            opened = optuna.load_study(study_name="shared", storage=storage)
            if "mlflow_run_id" in opened.user_attrs:
                break
        except KeyError:  # no such study yet
            pass
        assert workers[0].poll() is None, workers[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first worker never opened the study"
        time.sleep(1)
    workers.append(start())
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    _nested_trials(MlflowClient(mlflow_server), study, "tuned")
    assert len({t.user_attrs["worker"].split("pid ")[1] for t in study.trials}) == 2


@pytest.mark.slow
def test_a_journal_file_study_shared_by_two_worker_processes(tiny_config, tmp_path, monkeypatch):
    from medseg.tuning import tune

    monkeypatch.chdir(tmp_path)  # journal:/// is relative, like sqlite:///
    config = tiny_config(
        **{
            "train.epochs": 1,
            "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "tracking.artifact_root": str(tmp_path),
            "tracking.log_model": False,
            "tune.storage": "journal:///studies/optuna.log",
            "tune.study_name": "journal",
            "tune.space": ["train.learning_rate=cat:0.01|0.03"],
            "tune.n_trials": 4,
        }
    )
    result = tune(config, workers=2)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = tmp_path / "studies" / "optuna.log"
    study = optuna.load_study(study_name="journal", storage=JournalStorage(JournalFileBackend(str(path))))
    assert result.storage == f"journal:///{path}"
    _nested_trials(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), study, "medseg")
    assert len({t.user_attrs["worker"].split()[0] for t in study.trials}) == 2


def test_a_store_configured_earlier_in_the_process_is_not_taken_for_the_users_choice(
    tmp_path, monkeypatch
):
    # mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into the environment itself
    from medseg.config import Config
    from medseg.tracking.store import configure, tracking_from_environment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = Config().with_overrides({"tracking.tracking_uri": f"sqlite:///{tmp_path}/a.db",
                                     "tracking.artifact_root": str(tmp_path)})
    configure(first)
    assert os.environ.get("MLFLOW_TRACKING_URI") == f"sqlite:///{tmp_path}/a.db"
    assert tracking_from_environment(Config()).tracking_uri == Config().tracking.tracking_uri
    # a value the user sets afterwards counts again
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/user.db")
    assert tracking_from_environment(Config()).tracking_uri == f"sqlite:///{tmp_path}/user.db"
