"""No zombie trial: a tuning worker killed mid-trial (SIGKILL) has its trial failed and
retried by a live worker, its MLflow run closed; trials drawing the same values keep their
own checkpoints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from medseg.config import Config
from medseg.training import latest_checkpoint

optuna.logging.set_verbosity(optuna.logging.WARNING)

# a `medseg tune` process whose heartbeats come every second and go stale after 4 s
# (the defaults, 30 s and 120 s, would make the test wait minutes)
WORKER = textwrap.dedent(
    """
    import sys
    from medseg.tuning import study
    study.HEARTBEAT_INTERVAL, study.GRACE_PERIOD = 1, 4
    from medseg.cli import main
    sys.exit(main(["tune", "--config", sys.argv[1], "--best-config", sys.argv[2]]))
    """
)


def _tune_config(tiny_config, tmp_path, **overrides):
    return tiny_config(
        **{
            "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "tracking.artifact_root": str(tmp_path),
            "tracking.log_model": False,
            "tune.storage": f"sqlite:///{tmp_path}/optuna.db",
            "tune.study_name": "cp",
            "tune.pruner": "none",
            "train.checkpoint_dir": str(tmp_path / "checkpoints"),
            **overrides,
        }
    )


def _epochs(folder):
    """The epoch count of the latest checkpoint in a trial's folder (0 without one)."""
    found = [latest_checkpoint(p) for p in folder.iterdir() if p.is_dir()]
    found = [int(p.name.split("-")[1]) for p in found if p is not None]
    return max(found, default=0)


def test_only_trials_with_an_outcome_count_toward_n_trials():
    from medseg.tuning import finished_trials, trial_table

    study = optuna.create_study()
    states = optuna.trial.TrialState
    for state, attrs in [
        (states.COMPLETE, {}),
        (states.PRUNED, {}),
        (states.FAIL, {"error": "ValueError: depth 5 does not fit"}),  # its own error
        (states.FAIL, {"worker": "1 (pid 42)"}),  # died: no outcome
        (states.RUNNING, {}),
        (states.WAITING, {}),
    ]:
        study.add_trial(
            optuna.trial.create_trial(
                state=state, value=0.5 if state == states.COMPLETE else None, user_attrs=attrs
            )
        )
    assert [t.number for t in finished_trials(study)] == [0, 1, 2]
    errors = [r["error"] for r in trial_table(study)]
    assert errors[2] == "ValueError: depth 5 does not fit"
    assert "no heartbeat or interrupted (worker 1 (pid 42))" in errors[3]
    assert errors[:2] == [None, None] and errors[4:] == [None, None]


@pytest.mark.slow
def test_trials_drawing_the_same_values_keep_their_own_checkpoints(tiny_config, tmp_path):
    from medseg.tuning import tune

    # a space of one value: every trial draws the same config, so the config hash of
    # checkpoint_directory alone would send trial 1 to trial 0's finished checkpoints
    config = _tune_config(
        tiny_config, tmp_path, **{"tune.space": ["train.learning_rate=cat:0.03"],
                                  "tune.n_trials": 2}
    )
    best = tmp_path / "best.json"
    result = tune(config, workers=1, best_config=best)

    assert [t["state"] for t in result.trials] == ["COMPLETE", "COMPLETE"]
    assert result.trials[0]["params"] == result.trials[1]["params"]
    folders = sorted((tmp_path / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["cp-trial-0000", "cp-trial-0001"]
    assert [_epochs(f) for f in folders] == [2, 2]
    # each trial trained both its epochs (a resumed one would log none)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for t in result.trials:
        steps = [m.step for m in client.get_metric_history(t["mlflow_run_id"], "loss")]
        assert sorted(steps) == [0, 1]
    # the exported train config is the user's, not the trial's folder
    assert Config.from_file(best).train.checkpoint_dir == str(tmp_path / "checkpoints")


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_no_zombie_trial_or_run(tiny_config, tmp_path):
    from medseg.tuning import finished_trials, open_study, study_run

    n_trials = 3
    config = _tune_config(
        tiny_config,
        tmp_path,
        **{
            # two values, four or more trials: duplicate draws certain
            "tune.space": ["train.learning_rate=cat:0.01|0.03"],
            "tune.n_trials": n_trials,
            "train.epochs": 6,
        },
    )
    path = tmp_path / "tune.json"
    config.save(path)
    parent = study_run(open_study(config), config)  # both workers attach to it
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(tmp_path / "best.json")],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        for log in logs
    ]

    def output():
        return "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))

    try:
        # kill the worker of the first trial to finish an epoch (of six): mid-trial
        checkpoints = tmp_path / "checkpoints"
        deadline = time.monotonic() + 400
        while not (found := sorted(checkpoints.glob("cp-trial-*/*/epoch-[0-9][0-9][0-9][0-9]"))):
            assert all(w.poll() is None for w in workers), output()
            assert time.monotonic() < deadline, output()
            time.sleep(0.05)
        dead_folder = found[0].parents[1]
        dead = int(dead_folder.name.rsplit("-", 1)[1])
        storage = f"sqlite:///{tmp_path}/optuna.db"
        trial = optuna.load_study(study_name="cp", storage=storage).trials[dead]
        pid = int(re.search(r"pid (\d+)", trial.user_attrs["worker"]).group(1))
        victim = next(w for w in workers if w.pid == pid)
        os.kill(pid, signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        assert trial.state.name == "RUNNING"
        done_before = _epochs(dead_folder)  # what a retry resumes from
        survivor = next(w for w in workers if w is not victim)
        assert survivor.wait(timeout=900) == 0, output()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        for log in logs:
            log.close()

    study = optuna.load_study(study_name="cp", storage=storage)
    trials = {t.number: t for t in study.trials}
    states = {n: t.state.name for n, t in trials.items()}
    assert states[dead] == "FAIL", output()
    assert "RUNNING" not in states.values() and "WAITING" not in states.values()
    finished = finished_trials(study)
    assert dead not in [t.number for t in finished]  # a dead worker's trial is no outcome
    assert len(finished) >= n_trials
    assert all(t.state.name == "COMPLETE" for t in finished)

    # no run left RUNNING; the dead trial's run says why it failed
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name("medseg").experiment_id], max_results=1000
    )
    assert {r.info.status for r in runs} == {"FINISHED", "FAILED"}
    assert client.get_run(parent).info.status == "FINISHED"
    by_trial = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent
    }
    assert sorted(by_trial) == sorted(trials)
    assert by_trial[dead].info.status == "FAILED"
    assert by_trial[dead].data.tags["optuna.state"] == "FAIL"
    assert "no heartbeat" in by_trial[dead].data.tags["optuna.error"]
    assert f"pid {pid}" in by_trial[dead].data.tags["optuna.error"]

    # every trial trained in its own folder; a retry in the trial's it retries, resuming
    retries = [t for t in finished if t.system_attrs.get("failed_trial") == dead]
    assert len(retries) <= 1  # once at most
    own = {f"cp-trial-{t.system_attrs.get('failed_trial', t.number):04d}" for t in finished}
    assert {f.name for f in checkpoints.iterdir()} == own | {dead_folder.name}
    for t in finished:
        assert _epochs(checkpoints / f"cp-trial-{t.system_attrs.get('failed_trial', t.number):04d}") == 6
    for retry in retries:
        assert retry.params == trials[dead].params
        steps = [m.step for m in client.get_metric_history(by_trial[retry.number].info.run_id,
                                                           "loss")]
        assert sorted(steps) == list(range(done_before, 6))  # resumed, not retrained
    if not retries:  # the survivor reached n_trials first: the dead trial is failed only
        assert _epochs(dead_folder) == done_before


# a worker that takes a trial of the study, opens its MLflow run and dies (SIGKILL) with
# the trial RUNNING: what an OOM kill leaves behind
DYING_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    from medseg.config import Config
    from medseg.tuning import study as s
    s.HEARTBEAT_INTERVAL, s.GRACE_PERIOD = 1, 3
    config = Config.from_file(sys.argv[1])
    study = s.open_study(config)
    objective = s._Objective(config, s.study_run(study, config))
    trial = study.ask()
    trial.suggest_categorical("train.learning_rate", [0.03])
    run = objective.client.create_run(objective.experiment_id, tags={
        "mlflow.parentRunId": objective.parent_run_id, "optuna.trial_number": str(trial.number)})
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    trial.set_user_attr("worker", f"0 (pid {os.getpid()})")
    study._storage.record_heartbeat(trial._trial_id)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # our ask()
def test_the_last_worker_fails_a_dead_workers_trial_after_its_grace_period(
    tiny_config, tmp_path, monkeypatch
):
    from medseg.tuning import fail_dead_trials, open_study, study
    from medseg.tuning.study import _checkpoint_dir

    config = _tune_config(
        tiny_config, tmp_path, **{"tune.space": ["train.learning_rate=cat:0.03"],
                                  "tune.n_trials": 1}
    )
    path = tmp_path / "tune.json"
    config.save(path)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    child = subprocess.run(
        [sys.executable, "-c", DYING_WORKER, str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    killed_at = time.time()  # its one heartbeat came just before

    monkeypatch.setattr(study, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(study, "GRACE_PERIOD", 3)
    tuning = open_study(config)
    (dead,) = tuning.trials
    assert dead.state.name == "RUNNING"
    # two heartbeats missed, plus one second: sqlite's CURRENT_TIMESTAMP (Optuna's heartbeat
    # clock) has whole seconds, so 2.2 s may read as 2 s, which is not "more than 2"
    time.sleep(max(0.0, killed_at + 3.2 - time.time()))
    assert fail_dead_trials(tuning) == 1
    # it waited out the grace period (3 s) rather than fail a trial that might beat again
    assert 2.8 <= time.time() - killed_at < 30

    dead, retry = tuning.trials
    assert dead.state.name == "FAIL" and "error" not in dead.user_attrs
    assert retry.state.name == "WAITING" and retry.params == dead.params
    assert retry.system_attrs["failed_trial"] == dead.number
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["optuna.state"] == "FAIL"
    assert f"no heartbeat for 3 s (worker 0 (pid {child_pid(dead)}))" in run.data.tags[
        "optuna.error"
    ]
    # the retry trains in the dead trial's folder, so it resumes from its checkpoints
    trial = tuning.ask()
    assert trial.number == retry.number
    assert _checkpoint_dir(config, trial) == str(tmp_path / "checkpoints" / "cp-trial-0000")
    # nothing else is stale: a second call returns at once
    start = time.monotonic()
    assert fail_dead_trials(tuning) == 0 and time.monotonic() - start < 1


def child_pid(trial):
    return int(re.search(r"pid (\d+)", trial.user_attrs["worker"]).group(1))
