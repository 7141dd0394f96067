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

    # the second machine joins a study the first has opened (with its MLflow run); two
    # processes opening a new study in the same instant: the test after this one
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


# A `medseg tune` process that imports everything first, says so (a file), then waits for
# the barrier file: two of them open the study within milliseconds of each other.
_AT_THE_BARRIER = """
import os, sys, time
from medseg.cli import main
import medseg.tuning
open(sys.argv[1], "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
sys.exit(main(["tune", *sys.argv[3:]]))
"""


@pytest.mark.slow
def test_two_tune_processes_opening_a_new_study_in_the_same_instant_share_one_study_run(
    postgres_database, mlflow_server, tiny_data_dir, tmp_path
):
    from mlflow.entities import ViewType

    storage = postgres_database("optuna_race")
    args = _tune_overrides(
        tiny_data_dir, **{"tune.storage": storage, "tune.study_name": "race", "tune.n_trials": 2,
                          "tracking.tracking_uri": mlflow_server, "tracking.experiment": "race"}
    )
    barrier = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _AT_THE_BARRIER, str(tmp_path / f"ready{i}"), str(barrier),
             *args, "--workers", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert all(w.poll() is None for w in workers), [w.communicate()[1][-2000:] for w in workers]
        assert time.monotonic() < deadline, "the tune processes never got ready"
        time.sleep(0.1)
    barrier.touch()
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("race").experiment_id
    # every run ever made in the experiment, deleted ones too: one study run, no loser's
    runs = client.search_runs([experiment], run_view_type=ViewType.ALL)
    study_runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(study_runs) == 1, [(r.info.run_id, r.info.lifecycle_stage) for r in study_runs]
    parent = study_runs[0].info.run_id
    trial_runs = [r for r in runs if r.info.run_id != parent]
    assert study_runs[0].info.lifecycle_stage == "active"
    study = optuna.load_study(study_name="race", storage=storage)
    assert study.user_attrs["mlflow_run_id"] == parent
    for out, _ in outputs:  # both processes report the same study run
        assert f"MLflow study run {parent}" in out
    # every trial is one run nested under it, and nothing else is
    trials = {t.number: t for t in study.trials}
    assert {t.state.name for t in trials.values()} == {"COMPLETE"} and len(trials) >= 2
    nested = {int(r.data.tags["optuna.trial_number"]): r for r in trial_runs}
    assert sorted(nested) == sorted(trials)
    for number, run in nested.items():
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert trials[number].user_attrs["mlflow_run_id"] == run.info.run_id


def test_medseg_ui_on_an_mlflow_server_prints_its_url_and_starts_nothing(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for argv, extra in (
        (["--tracking-uri", f"http://ann:s3cret@127.0.0.1:{port}"], {}),
        ([], {"MLFLOW_TRACKING_URI": f"https://ann:s3cret@mlflow.example.org:{port}"}),
    ):
        # a local UI would run until killed: the timeout fails the test
        done = subprocess.run(
            [sys.executable, "-m", "medseg.cli", "ui", *argv, "--port", str(free_port())],
            env={**env, **extra}, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        host = "127.0.0.1" if argv else "mlflow.example.org"
        assert f"MLflow server http{'' if argv else 's'}://ann:***@{host}:{port}" in done.stdout
        assert "s3cret" not in done.stdout + done.stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_medseg_ui_serves_a_postgresql_store_on_loopback(postgres_database, tmp_path):
    import signal
    import urllib.request

    store = postgres_database("ui_store")
    client = MlflowClient(store)  # makes MLflow's tables
    experiment_id = client.create_experiment("ui-demo", artifact_location=tmp_path.as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    port = free_port()
    log = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen(
        [sys.executable, "-m", "medseg.cli", "ui", "--tracking-uri", store, "--port", str(port)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "medseg ui did not start"
                time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}",
                                    timeout=30) as response:
            run = json.load(response)["run"]
        assert run["info"]["experiment_id"] == experiment_id
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
        log.close()
    assert f"MLflow UI on http://127.0.0.1:{port}" in (tmp_path / "ui.log").read_text()


def test_a_process_stuck_creating_the_study_run_fails_the_next_one_after_the_lock_timeout(
    postgres_database, tmp_path, monkeypatch
):
    import sqlalchemy

    from medseg.tuning import study as study_module

    storage = postgres_database("optuna_lock")
    config = Config().with_overrides({
        "tune.storage": storage, "tune.study_name": "locked",
        "tune.space": ["train.learning_rate=cat:0.01|0.03"],
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.artifact_root": str(tmp_path),
    })
    study = study_module.open_study(config)
    key = study_module._lock_key("locked")
    engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
    monkeypatch.setattr(study_module, "STUDY_LOCK_TIMEOUT", 1)
    with engine.connect() as holder:  # another process, hung while creating the run
        holder.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="another process has been creating the MLflow run"):
            study_module.study_run(study, config)
        assert time.monotonic() - started < 30
        assert "mlflow_run_id" not in study.user_attrs
    # the holder gone, the run is made, and the lock is free again afterwards
    run_id = study_module.study_run(study, config)
    assert study_module.load_study(config).user_attrs["mlflow_run_id"] == run_id
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.tags[
        "optuna.study_name"] == "locked"
    with engine.connect() as other:
        assert other.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
    engine.dispose()
